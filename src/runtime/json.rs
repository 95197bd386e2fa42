//! Reading a line's JSON without building a `serde_json::Value` tree: the
//! parsers' fast path (BENCHMARKS.md, issue 15).
//!
//! A runtime names the few fields a hot line needs; everything else is
//! walked and dropped as it is read. Invariant: a line is accepted here
//! exactly when `serde_json::from_str::<Value>` accepts it. Every value goes
//! through `deserialize_any`, the same entry point `Value` uses, so the
//! nesting limit, number ranges, string escapes and UTF-16 surrogate checks
//! are serde_json's own (`IgnoredAny` would be laxer: it neither checks
//! surrogates nor parses numbers nor counts depth). Duplicate keys resolve
//! as in `Value`: the last one wins. Non-goal: what the fields mean — that is
//! each runtime's parser.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};

/// Any JSON value, read and dropped.
pub struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor).map(|_| Skip)
    }
}

/// A JSON value kept only when it is a string, a bool or a number; arrays
/// and objects are walked (validated) and dropped.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'a> {
    Str(Cow<'a, str>),
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Null,
    Compound,
}

impl<'a> Scalar<'a> {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Scalar::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The string, owned only when it had escapes.
    pub fn into_str(self) -> Option<Cow<'a, str>> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::I64(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::U64(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::F64(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_string())))
    }
    fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar<'de>, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Scalar::Compound)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar<'de>, A::Error> {
        while map.next_key::<Key<'de>>()?.is_some() {
            map.next_value::<Skip>()?;
        }
        Ok(Scalar::Compound)
    }
}

/// An object key, borrowed from the line unless it had escapes.
pub struct Key<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_any(ScalarVisitor)? {
            Scalar::Str(s) => Ok(Key(s)),
            _ => Err(D::Error::custom("a key that is not a string")),
        }
    }
}

/// The scalar `visit_*` methods of a visitor for objects or arrays: every
/// scalar gives `$out` (`E` is the error type in scope).
macro_rules! scalars_give {
    ($value:ty, $out:expr) => {
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<$value, E> {
            $out
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<$value, E> {
            $out
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<$value, E> {
            $out
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<$value, E> {
            $out
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<$value, E> {
            $out
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<$value, E> {
            $out
        }
    };
}

/// The top-level fields a runtime wants from a hot line.
pub trait Fields<'de>: Default {
    /// Reads the value of `key` from `map` (exactly one `next_value`), or
    /// returns false without reading it (it is then skipped).
    fn field<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error>;
}

/// A line read by [`read_line`]: its `type`, its session id and the
/// runtime's fields.
pub struct Top<'a, F> {
    pub kind: Option<Scalar<'a>>,
    pub session_id: Option<Scalar<'a>>,
    pub fields: F,
}

/// Reads `text` as one JSON object (trailing whitespace only, like
/// `serde_json::from_str`). `session_key` names the session id field
/// (`session_id`; codex: `thread_id`). Errors when `Value` would: a syntax
/// error, too deep, a number out of range, a bad escape; also when the line
/// is not an object (the full path then records it as malformed).
pub fn read_line<'a, F: Fields<'a>>(
    text: &'a str,
    session_key: &'static str,
) -> Result<Top<'a, F>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let top = TopSeed::<F> {
        session_key,
        _f: std::marker::PhantomData,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(top)
}

struct TopSeed<F> {
    session_key: &'static str,
    _f: std::marker::PhantomData<F>,
}

impl<'de, F: Fields<'de>> DeserializeSeed<'de> for TopSeed<F> {
    type Value = Top<'de, F>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Top<'de, F>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, F: Fields<'de>> Visitor<'de> for TopSeed<F> {
    type Value = Top<'de, F>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top<'de, F>, A::Error> {
        let mut top = Top {
            kind: None,
            session_id: None,
            fields: F::default(),
        };
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if key == "type" {
                top.kind = Some(map.next_value()?);
            } else if key == self.session_key {
                top.session_id = Some(map.next_value()?);
            } else if !top.fields.field(&key, &mut map)? {
                map.next_value::<Skip>()?;
            }
        }
        Ok(top)
    }

    // Anything but an object: not a line the fast path reads.
    scalars_give!(Top<'de, F>, Err(E::custom("not an object")));
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Top<'de, F>, A::Error> {
        Err(A::Error::custom("not an object"))
    }
}

/// `Some(items)` when the value is an array (each item read with `T`), `None`
/// for anything else (walked and dropped) — like `Value::as_array`.
pub struct ArrayOf<T>(pub Option<Vec<T>>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ArrayOf<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = ArrayOf<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ArrayOf<T>, A::Error> {
                let mut items = Vec::new();
                while let Some(t) = seq.next_element::<T>()? {
                    items.push(t);
                }
                Ok(ArrayOf(Some(items)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ArrayOf<T>, A::Error> {
                ScalarVisitor.visit_map(map).map(|_| ArrayOf(None))
            }
            scalars_give!(ArrayOf<T>, Ok(ArrayOf(None)));
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// An object read field by field with `F`, or `None` for anything else
/// (walked and dropped) — like `Value::as_object`.
pub struct ObjectOf<F>(pub Option<F>);

impl<'de, F: Fields<'de>> Deserialize<'de> for ObjectOf<F> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<F>(std::marker::PhantomData<F>);
        impl<'de, F: Fields<'de>> Visitor<'de> for V<F> {
            type Value = ObjectOf<F>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ObjectOf<F>, A::Error> {
                let mut fields = F::default();
                while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                    if !fields.field(&key, &mut map)? {
                        map.next_value::<Skip>()?;
                    }
                }
                Ok(ObjectOf(Some(fields)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<ObjectOf<F>, A::Error> {
                ScalarVisitor.visit_seq(seq).map(|_| ObjectOf(None))
            }
            scalars_give!(ObjectOf<F>, Ok(ObjectOf(None)));
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// Rewrites lone UTF-16 surrogate escapes (`\ud99c` without its pair) to
/// `\ufffd`, as a browser's `JSON.parse` reads them (SPEC §6.4). `None` when
/// there is none (the caller's parse failed for another reason). Only called
/// after a parse failed, so it costs nothing on the hot path.
pub fn repair_lone_surrogates(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let hex4 = |at: usize| -> Option<u16> {
        b.get(at..at + 4)?.iter().try_fold(0u16, |n, &c| {
            Some(n << 4 | (c as char).to_digit(16)? as u16)
        })
    };
    let escape_at = |at: usize| -> Option<u16> {
        (b.get(at) == Some(&b'\\') && b.get(at + 1) == Some(&b'u'))
            .then(|| hex4(at + 2))
            .flatten()
    };
    let mut out: Option<String> = None;
    let mut copied = 0; // bytes of `text` already in `out`
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            i += 1;
            continue;
        }
        match b.get(i + 1) {
            Some(b'u') => {}
            Some(_) => {
                i += 2; // any other escape, `\\` included: not a \u
                continue;
            }
            None => break,
        }
        let Some(n) = hex4(i + 2) else {
            i += 2;
            continue;
        };
        let paired = (0xD800..=0xDBFF).contains(&n)
            && escape_at(i + 6).is_some_and(|m| (0xDC00..=0xDFFF).contains(&m));
        if paired {
            i += 12;
        } else if (0xD800..=0xDFFF).contains(&n) {
            let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
            o.push_str(&text[copied..i]);
            o.push_str("\\ufffd");
            i += 6;
            copied = i;
        } else {
            i += 6;
        }
    }
    let mut o = out?;
    o.push_str(&text[copied..]);
    Some(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[derive(Default)]
    struct Nothing;
    impl<'de> Fields<'de> for Nothing {
        fn field<A: MapAccess<'de>>(&mut self, _: &str, _: &mut A) -> Result<bool, A::Error> {
            Ok(false)
        }
    }

    /// Accepted here exactly when `Value` accepts it (and it is an object).
    #[test]
    fn accepts_what_value_accepts() {
        let deep_ok = format!(
            "{{\"type\":\"x\",\"v\":{}1{}}}",
            "[".repeat(126),
            "]".repeat(126)
        );
        let deep_bad = format!(
            "{{\"type\":\"x\",\"v\":{}1{}}}",
            "[".repeat(127),
            "]".repeat(127)
        );
        let cases = [
            r#"{"type":"a"}"#.to_string(),
            r#"{"type":"a","n":1e400}"#.into(),
            r#"{"type":"a","n":-1e400}"#.into(),
            r#"{"type":"a","n":1e-400}"#.into(),
            r#"{"type":"a","s":"\ud83d\ude00"}"#.into(),
            r#"{"type":"a","s":"\ud83d"}"#.into(),
            r#"{"type":"a","s":"\ude00"}"#.into(),
            r#"{"type":"a","\ud83d":1}"#.into(),
            r#"{"type":"a","s":"\x"}"#.into(),
            r#"{"type":"a"} x"#.into(),
            "{\"type\":\"a\"}  \n".into(),
            r#"{"type":"a",}"#.into(),
            r#"[1]"#.into(),
            r#""s""#.into(),
            r#"{"type":"a","type":"b"}"#.into(),
            deep_ok,
            deep_bad,
        ];
        for c in cases {
            let full = matches!(serde_json::from_str::<Value>(&c), Ok(Value::Object(_)));
            let fast = read_line::<Nothing>(&c, "session_id").is_ok();
            assert_eq!(fast, full, "{c}");
        }
    }

    #[test]
    fn last_duplicate_wins_and_escaped_keys_match() {
        let t = read_line::<Nothing>(
            r#"{"type":"a","typ\u0065":"b","session_id":"s"}"#,
            "session_id",
        )
        .unwrap();
        assert_eq!(t.kind.unwrap().as_str(), Some("b"));
        assert_eq!(t.session_id.unwrap().as_str(), Some("s"));
    }

    #[test]
    fn scalar_borrows_plain_strings() {
        let mut de = serde_json::Deserializer::from_str(r#""abc""#);
        let s = Scalar::deserialize(&mut de).unwrap();
        assert!(matches!(s, Scalar::Str(Cow::Borrowed("abc"))));
        let mut de = serde_json::Deserializer::from_str(r#""a\nc""#);
        let s = Scalar::deserialize(&mut de).unwrap();
        assert!(matches!(s, Scalar::Str(Cow::Owned(_))));
    }

    #[test]
    fn repairs_only_lone_surrogates() {
        let r = |s: &str| repair_lone_surrogates(s);
        assert_eq!(
            r(r#"{"a":"x\ud99cy"}"#).as_deref(),
            Some(r#"{"a":"x\ufffdy"}"#)
        );
        assert_eq!(r(r#"{"a":"\uDC00"}"#).as_deref(), Some(r#"{"a":"\ufffd"}"#));
        assert_eq!(r(r#"{"a":"\ud83d\ude00"}"#), None);
        assert_eq!(
            r(r#"{"a":"\ud83d\ud83d\ude00"}"#).as_deref(),
            Some(r#"{"a":"\ufffd\ud83d\ude00"}"#)
        );
        assert_eq!(r(r#"{"a":"\\ud800"}"#), None, "an escaped backslash");
        assert_eq!(
            r(r#"{"a":"\\\ud800"}"#).as_deref(),
            Some(r#"{"a":"\\\ufffd"}"#)
        );
        assert_eq!(
            r(r#"{"a":"\ud800\n"}"#).as_deref(),
            Some(r#"{"a":"\ufffd\n"}"#)
        );
        assert_eq!(
            r(r#"{"a":"é\ud800"}"#).as_deref(),
            Some(r#"{"a":"é\ufffd"}"#)
        );
        assert_eq!(r(r#"{"a":"\u12"}"#), None);
        assert_eq!(r("\\"), None);
        let fixed = r(r#"{"type":"result","result":"a\ud99cb"}"#).unwrap();
        let v: Value = serde_json::from_str(&fixed).unwrap();
        assert_eq!(v["result"], "a\u{fffd}b");
    }
}
