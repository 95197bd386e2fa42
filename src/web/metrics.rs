//! `GET /metrics`: the Prometheus text format (0.0.4), every name prefixed
//! `runner_`, encoded by `prometheus-client`.
//!
//! Two sources: [`Totals`] read from the store on each scrape (turns,
//! durations, lines, events, cost, tokens, mail, agents — the same numbers
//! in `serve` and in the standalone `runner web`), and [`ServeCounters`],
//! atomics that only `serve` increments (backoffs, lease waits, sweeps and
//! their repairs). Invariant: a counter derived from rows only grows while
//! rows are not deleted. Non-goal: fleet hosts (no fleet mode yet).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::state::State;
use crate::store::views::Totals;

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Counters only `serve` sees. Cloning shares the counts.
#[derive(Debug, Clone, Default)]
pub struct ServeCounters {
    pub backoffs: Counter,
    pub lease_waits: Counter,
    pub sweeps: Counter,
    pub sweep_repairs: Family<Vec<(&'static str, &'static str)>, Counter>,
}

/// A sweep report's repairs, by `kind` label value.
fn repairs(r: &crate::sweep::Report) -> [(&'static str, u64); 7] {
    [
        ("orphan_turn", r.orphan_turns),
        ("group_killed", r.groups_killed),
        ("claim_retried", r.claims_retried),
        ("claim_released", r.claims_released),
        ("claim_dead", r.claims_dead),
        ("state_fixed", r.states_fixed),
        ("turn_stopped", r.turns_stopped),
    ]
}

impl ServeCounters {
    /// Adds one sweep pass and its repairs by kind.
    pub fn sweep(&self, r: &crate::sweep::Report) {
        self.sweeps.inc();
        for (kind, n) in repairs(r) {
            let _ = self
                .sweep_repairs
                .get_or_create(&vec![("kind", kind)])
                .inc_by(n);
        }
    }

    fn register(&self, reg: &mut Registry) {
        reg.register(
            "serve_backoffs",
            "Times serve backed an agent off after a refused or spawn_failed turn",
            self.backoffs.clone(),
        );
        reg.register(
            "lease_waits",
            "Times serve found an agent's turn lease held by another process and left it for a later poll",
            self.lease_waits.clone(),
        );
        reg.register("sweeps", "Sweep passes run by serve", self.sweeps.clone());
        for (kind, _) in repairs(&crate::sweep::Report::default()) {
            // Every kind shows from the start, at 0, so rate() works at once.
            let _ = self.sweep_repairs.get_or_create(&vec![("kind", kind)]);
        }
        reg.register(
            "sweep_repairs",
            "Repairs made by serve's sweep passes, by kind",
            self.sweep_repairs.clone(),
        );
    }
}

/// The dashboard's own live feed: clients watching and store polls made.
#[derive(Debug, Clone, Copy, Default)]
pub struct LiveStats {
    pub clients: u64,
    pub polls: u64,
}

/// The store's totals (and the live feed's figures) as metrics, encoded at
/// scrape time.
#[derive(Debug)]
struct TotalsCollector(Totals, LiveStats);

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: impl prometheus_client::encoding::EncodeCounterValue + Copy,
) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge_family(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &str,
    values: &[(String, u64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (l, v) in values {
        ConstGauge::new(*v as i64).encode(m.encode_family(&[(label, l.as_str())])?)?;
    }
    Ok(())
}

impl Collector for TotalsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let t = &self.0;
        {
            let mut m = enc.encode_descriptor(
                "turns",
                "Finished turns by outcome",
                None,
                MetricType::Counter,
            )?;
            for (outcome, n) in &t.turns_by_outcome {
                ConstCounter::new(*n).encode(m.encode_family(&[("outcome", outcome.as_str())])?)?;
            }
        }
        let g = ConstGauge::new(t.turns_in_flight as i64);
        g.encode(enc.encode_descriptor(
            "turns_in_flight",
            "Turns started and not finished",
            None,
            g.metric_type(),
        )?)?;
        enc.encode_descriptor(
            "turn_duration_seconds",
            "Wall-clock duration of finished turns",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            t.duration.sum,
            t.duration.count,
            &t.duration.buckets,
            None,
        )?;
        counter(
            &mut enc,
            "lines_ingested",
            "Stdout lines ingested from agents (finished turns)",
            t.lines,
        )?;
        counter(
            &mut enc,
            "events_ingested",
            "Rows written to events (finished turns)",
            t.events,
        )?;
        counter(
            &mut enc,
            "malformed_lines",
            "Stdout lines that were not valid JSON (finished turns)",
            t.malformed_lines,
        )?;
        counter(
            &mut enc,
            "cost_usd",
            "Cost reported by the agents, in US dollars",
            t.cost_usd,
        )?;
        {
            let mut m = enc.encode_descriptor(
                "tokens",
                "Tokens reported by the agents, by direction",
                None,
                MetricType::Counter,
            )?;
            for (dir, n) in [("input", t.input_tokens), ("output", t.output_tokens)] {
                ConstCounter::new(n).encode(m.encode_family(&[("direction", dir)])?)?;
            }
        }
        let mail = [
            ("due", t.mail.due),
            ("claimed", t.mail.claimed),
            ("retrying", t.mail.retrying),
            ("dead", t.mail.dead),
        ]
        .map(|(k, v)| (k.to_string(), v));
        gauge_family(&mut enc, "mail", "Mail by claim state", "state", &mail)?;
        counter(
            &mut enc,
            "mail_retries",
            "Failed deliveries of mail that were retried or ended dead",
            t.mail_retries,
        )?;
        // Every state shows, at 0 when no agent is in it.
        let states: Vec<(String, u64)> = State::ALL
            .iter()
            .map(|s| s.as_str().to_string())
            .chain(
                t.agents_by_state
                    .iter()
                    .map(|(s, _)| s.clone())
                    .filter(|s| State::parse(s).is_none()),
            )
            .map(|s| {
                let n = t
                    .agents_by_state
                    .iter()
                    .find(|(k, _)| *k == s)
                    .map_or(0, |(_, n)| *n);
                (s, n)
            })
            .collect();
        gauge_family(&mut enc, "agents", "Agents by state", "state", &states)?;
        if !t.hosts_by_state.is_empty() {
            // Fleet mode: every host state shows, at 0 when no host is in it.
            let hosts: Vec<(String, u64)> = ["online", "offline", "stopped"]
                .iter()
                .map(|s| {
                    let n = t
                        .hosts_by_state
                        .iter()
                        .find(|(k, _)| k == s)
                        .map_or(0, |(_, n)| *n);
                    (s.to_string(), n)
                })
                .collect();
            gauge_family(&mut enc, "hosts", "Fleet hosts by state", "state", &hosts)?;
        }
        let g = ConstGauge::new(self.1.clients as i64);
        g.encode(enc.encode_descriptor(
            "http_live_clients",
            "Dashboard clients connected to the live feed",
            None,
            g.metric_type(),
        )?)?;
        counter(
            &mut enc,
            "http_live_polls",
            "Store polls made for the live feed (none while no client is connected)",
            self.1.polls,
        )?;
        Ok(())
    }
}

/// Encodes one scrape: the store's totals, and `serve`'s counters when given.
pub fn encode(
    totals: Totals,
    serve: Option<&ServeCounters>,
    live: LiveStats,
) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix("runner");
    reg.register_collector(Box::new(TotalsCollector(totals, live)));
    if let Some(s) = serve {
        s.register(&mut reg);
    }
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &reg)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::views::Histogram;

    #[test]
    fn names_types_and_help_follow_the_conventions() {
        let t = Totals {
            turns_by_outcome: vec![("done".into(), 3), ("stalled".into(), 1)],
            duration: Histogram {
                buckets: vec![(1.0, 2), (5.0, 1), (f64::INFINITY, 1)],
                sum: 9.5,
                count: 4,
            },
            cost_usd: 0.25,
            agents_by_state: vec![("working".into(), 2)],
            hosts_by_state: vec![("online".into(), 3)],
            ..Totals::default()
        };
        let c = ServeCounters::default();
        c.backoffs.inc();
        c.sweep(&crate::sweep::Report {
            orphan_turns: 1,
            ..Default::default()
        });
        let text = encode(t, Some(&c), LiveStats::default()).unwrap();
        for want in [
            "# TYPE runner_turns_total counter",
            "runner_turns_total{outcome=\"done\"} 3",
            "# TYPE runner_turn_duration_seconds histogram",
            "runner_turn_duration_seconds_bucket{le=\"5\"} 3",
            "runner_turn_duration_seconds_bucket{le=\"+Inf\"} 4",
            "runner_turn_duration_seconds_count 4",
            "runner_cost_usd_total 0.25",
            "runner_agents{state=\"working\"} 2",
            "runner_agents{state=\"zombie\"} 0",
            "runner_hosts{state=\"online\"} 3",
            "runner_hosts{state=\"offline\"} 0",
            "runner_serve_backoffs_total 1",
            "runner_sweep_repairs_total{kind=\"orphan_turn\"} 1",
            "runner_sweep_repairs_total{kind=\"claim_dead\"} 0",
            "# HELP runner_mail Mail by claim state",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(
            !encode(Totals::default(), None, LiveStats::default())
                .unwrap()
                .contains("serve_backoffs")
        );
    }
}
