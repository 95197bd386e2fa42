//! Reading a line's JSON without building a `serde_json::Value` tree: the
//! parsers' fast path (BENCHMARKS.md, issue 15).
//!
//! [`Scanner`] is a hand-written byte reader that walks a line once,
//! validating it, and hands the caller each object key so that a runtime
//! reads the few fields a hot line needs and skips the rest (string bodies
//! by vectorized 16-byte tests and `memchr`, never byte by byte). It also
//! serves `stream.rs`'s lone-surrogate repair. Invariant: it ACCEPTS (returns `Some`) only a line
//! `serde_json::from_str::<Value>` accepts, and what it returns is what that
//! `Value` holds: strings unescaped exactly as serde_json does (borrowed when
//! they have no escape), whitespace only ` \t\n\r`, control bytes in strings
//! refused, and — the caller's part — the last of duplicated keys wins. It
//! may DECLINE (`None`) any line, valid or not, it does not vouch for: then
//! the caller takes the full `Value` path, the reference. It declines an
//! integer part over 18 digits, an exponent over 2 digits, a `\u` lone
//! surrogate, nesting deeper than [`MAX_DEPTH`]. Non-goals: error messages
//! (the full path reports), what the fields mean (each runtime's parser).

use std::borrow::Cow;

/// Deepest nesting of arrays and objects accepted (the line's own object is
/// 1); serde_json's limit is 128.
pub const MAX_DEPTH: usize = 64;

/// A cursor over one line's JSON text. Every method returns `None` to
/// decline; after a `None` the cursor is meaningless.
pub struct Scanner<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
    depth: usize,
}

/// A value as a field reader wants it: a string, a bool, or something else
/// (walked, validated and dropped).
#[derive(Debug, Clone, PartialEq)]
pub enum Lite<'a> {
    Str(Cow<'a, str>),
    Bool(bool),
    Other,
}

impl<'a> Lite<'a> {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Lite::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Lite::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The string, owned only when it had escapes.
    pub fn into_str(self) -> Option<Cow<'a, str>> {
        match self {
            Lite::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Reads `text` as one JSON object with `f` (see [`Scanner::object`]);
/// only whitespace may follow it, as in `serde_json::from_str`. `None`: the
/// line is declined (not an object, invalid, or beyond what the scanner
/// vouches for, or `f` declined).
pub fn read_object<'a>(
    text: &'a str,
    f: impl FnMut(&mut Scanner<'a>, Cow<'a, str>) -> Option<bool>,
) -> Option<()> {
    let mut sc = Scanner::new(text);
    sc.object(f)?;
    sc.ws();
    (sc.i == sc.b.len()).then_some(())
}

/// Ends a run of plain string bytes: `"`, `\` or a control byte (which
/// serde_json refuses inside a string).
#[inline(always)]
fn special(c: u8) -> bool {
    (c == b'"') | (c == b'\\') | (c < 0x20)
}

impl<'a> Scanner<'a> {
    pub fn new(text: &'a str) -> Scanner<'a> {
        Scanner {
            s: text,
            b: text.as_bytes(),
            i: 0,
            depth: 0,
        }
    }

    /// Skips JSON whitespace.
    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    /// The first byte of what comes next, after whitespace.
    #[inline(always)]
    pub fn peek(&mut self) -> Option<u8> {
        match self.b.get(self.i) {
            Some(&c) if c > b' ' => Some(c),
            _ => {
                self.ws();
                self.b.get(self.i).copied()
            }
        }
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        self.i += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }

    /// Reads an object, calling `f` with each key (unescaped) and the cursor
    /// at its value: `f` reads exactly that value and returns true, or
    /// returns false and the value is skipped. Declines when the value is
    /// not an object.
    pub fn object(
        &mut self,
        mut f: impl FnMut(&mut Self, Cow<'a, str>) -> Option<bool>,
    ) -> Option<()> {
        if self.peek()? != b'{' {
            return None;
        }
        self.enter()?;
        if self.peek()? == b'}' {
            self.i += 1;
            self.depth -= 1;
            return Some(());
        }
        loop {
            if self.peek()? != b'"' {
                return None;
            }
            let key = self.string()?;
            if self.peek()? != b':' {
                return None;
            }
            self.i += 1;
            if !f(self, key)? {
                self.skip()?;
            }
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    self.depth -= 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// [`Scanner::object`] with every value skipped (keys validated, not
    /// unescaped). Kept a separate loop on purpose: sharing the container
    /// walk with `object` and `array` cost the reader 3–5M instructions on
    /// the 14k-line callgrind turn (BENCHMARKS.md, session 4).
    fn skip_object(&mut self) -> Option<()> {
        self.enter()?;
        if self.peek()? == b'}' {
            self.i += 1;
            self.depth -= 1;
            return Some(());
        }
        loop {
            if self.peek()? != b'"' {
                return None;
            }
            self.skip_string()?;
            if self.peek()? != b':' {
                return None;
            }
            self.i += 1;
            self.skip()?;
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    self.depth -= 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Reads an array, calling `f` with the cursor at each item (`f` reads
    /// exactly that item). Declines when the value is not an array.
    pub fn array(&mut self, mut f: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        if self.peek()? != b'[' {
            return None;
        }
        self.enter()?;
        if self.peek()? == b']' {
            self.i += 1;
            self.depth -= 1;
            return Some(());
        }
        loop {
            f(self)?;
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    self.depth -= 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Walks (validates) any value and drops it.
    pub fn skip(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.skip_string(),
            b'{' => self.skip_object(),
            b'[' => self.array(|sc| sc.skip()),
            b't' => self.word(b"true"),
            b'f' => self.word(b"false"),
            b'n' => self.word(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// Any value: a string (unescaped), a bool, or walked and dropped.
    pub fn lite(&mut self) -> Option<Lite<'a>> {
        Some(match self.peek()? {
            b'"' => Lite::Str(self.string()?),
            b't' => {
                self.word(b"true")?;
                Lite::Bool(true)
            }
            b'f' => {
                self.word(b"false")?;
                Lite::Bool(false)
            }
            _ => {
                self.skip()?;
                Lite::Other
            }
        })
    }

    /// True when the value is a string; walked and dropped either way.
    pub fn is_string(&mut self) -> Option<bool> {
        let s = self.peek()? == b'"';
        self.skip()?;
        Some(s)
    }

    /// Any value, validated, as its text (for `serde_json` to read).
    pub fn raw(&mut self) -> Option<&'a str> {
        self.ws();
        let start = self.i;
        self.skip()?;
        self.s.get(start..self.i)
    }

    fn word(&mut self, w: &[u8]) -> Option<()> {
        if self.b.get(self.i..self.i + w.len())? != w {
            return None;
        }
        self.i += w.len();
        Some(())
    }

    /// A number in JSON's grammar whose value serde_json surely accepts:
    /// at most 18 integer digits, at most 2 exponent digits (so it is
    /// finite), any fraction.
    fn number(&mut self) -> Option<()> {
        let b = self.b;
        let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
        let mut i = self.i;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        let from = i;
        match b.get(i)? {
            b'0' => i += 1,
            b'1'..=b'9' => {
                while digit(i) {
                    i += 1;
                }
            }
            _ => return None,
        }
        if i - from > 18 {
            return None;
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            let from = i;
            while digit(i) {
                i += 1;
            }
            if i == from {
                return None;
            }
        }
        if let Some(b'e' | b'E') = b.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = b.get(i) {
                i += 1;
            }
            let from = i;
            while digit(i) {
                i += 1;
            }
            if i == from || i - from > 2 {
                return None;
            }
        }
        self.i = i;
        Some(())
    }

    /// Moves to the first `"`, `\` or control byte at or after the cursor
    /// (or to the end). The first 16 bytes are tested at once (the compiler
    /// turns the test into vector compares; the first hit is the lowest set
    /// byte of the mask): most strings end there. A longer run is searched
    /// with `memchr2` for `"`/`\`, and the span before it checked for a
    /// control byte with a min-reduction (also vectorized).
    #[inline(always)]
    fn skip_plain(&mut self) {
        const W: usize = 16;
        let b = self.b;
        let i = self.i;
        let Some(chunk) = b.get(i..).and_then(<[u8]>::first_chunk::<W>) else {
            self.skip_plain_short();
            return;
        };
        let mut hits = [0u8; W];
        for (h, &c) in hits.iter_mut().zip(chunk) {
            *h = 0u8.wrapping_sub(special(c) as u8);
        }
        let mask = u128::from_le_bytes(hits);
        if mask != 0 {
            self.i = i + (mask.trailing_zeros() / 8) as usize;
        } else {
            self.skip_plain_long(i + W);
        }
    }

    /// [`Scanner::skip_plain`] on fewer than 16 bytes left in the line.
    #[inline(never)]
    fn skip_plain_short(&mut self) {
        while self.b.get(self.i).is_some_and(|&c| !special(c)) {
            self.i += 1;
        }
    }

    /// [`Scanner::skip_plain`] past a first 16 plain bytes, from `from`.
    #[inline(never)]
    fn skip_plain_long(&mut self, from: usize) {
        let rest = self.b.get(from..).unwrap_or_default();
        let n = memchr::memchr2(b'"', b'\\', rest).unwrap_or(rest.len());
        let span = &rest[..n];
        let low = span.iter().fold(u8::MAX, |m, &c| m.min(c));
        self.i = from
            + if low < 0x20 {
                span.iter().position(|&c| c < 0x20).unwrap_or(n)
            } else {
                n
            };
    }

    /// A string (the cursor at its `"`), unescaped; borrowed from the line
    /// when it has no escape.
    #[inline(always)]
    pub fn string(&mut self) -> Option<Cow<'a, str>> {
        self.i += 1;
        let start = self.i;
        self.skip_plain();
        if self.b.get(self.i) == Some(&b'"') {
            let s = self.s.get(start..self.i)?;
            self.i += 1;
            return Some(Cow::Borrowed(s));
        }
        self.string_rest(start)
    }

    /// The rest of a string from its first `\` (or bad byte) on.
    #[inline(never)]
    fn string_rest(&mut self, start: usize) -> Option<Cow<'a, str>> {
        if self.b.get(self.i) != Some(&b'\\') {
            return None;
        }
        let mut out = String::with_capacity(self.i - start + 16);
        out.push_str(self.s.get(start..self.i)?);
        loop {
            self.i += 1;
            out.push(self.escape()?);
            let from = self.i;
            self.skip_plain();
            out.push_str(self.s.get(from..self.i)?);
            match self.b.get(self.i)? {
                b'"' => {
                    self.i += 1;
                    return Some(Cow::Owned(out));
                }
                b'\\' => {}
                _ => return None,
            }
        }
    }

    /// A string (the cursor at its `"`), validated and dropped.
    #[inline(always)]
    fn skip_string(&mut self) -> Option<()> {
        self.i += 1;
        self.skip_plain();
        if self.b.get(self.i) == Some(&b'"') {
            self.i += 1;
            return Some(());
        }
        self.skip_string_rest()
    }

    /// The rest of a skipped string from its first `\` (or bad byte) on.
    #[inline(never)]
    fn skip_string_rest(&mut self) -> Option<()> {
        loop {
            match self.b.get(self.i)? {
                b'"' => {
                    self.i += 1;
                    return Some(());
                }
                b'\\' => {
                    self.i += 1;
                    self.escape()?;
                    self.skip_plain();
                }
                _ => return None,
            }
        }
    }

    /// The character of the escape after a `\` (the cursor past it), as
    /// serde_json reads it; declines a lone surrogate (the full path
    /// repairs those, SPEC §6.4).
    fn escape(&mut self) -> Option<char> {
        let c = *self.b.get(self.i)?;
        self.i += 1;
        Some(match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => match self.hex4()? {
                hi @ 0xD800..=0xDBFF => {
                    if self.b.get(self.i..self.i + 2)? != b"\\u" {
                        return None;
                    }
                    self.i += 2;
                    let lo = self.hex4()?;
                    if !(0xDC00..=0xDFFF).contains(&lo) {
                        return None;
                    }
                    char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))?
                }
                n => char::from_u32(n)?, // None for a lone trailing surrogate
            },
            _ => return None,
        })
    }

    fn hex4(&mut self) -> Option<u32> {
        let h = self.b.get(self.i..self.i + 4)?;
        let mut n = 0;
        for &c in h {
            n = n << 4 | (c as char).to_digit(16)?;
        }
        self.i += 4;
        Some(n)
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
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    /// A whole `Value` built through the scanner (last duplicate wins, as
    /// in `Value`): what it returns for any text it accepts.
    fn build(sc: &mut Scanner<'_>) -> Option<Value> {
        match sc.peek()? {
            b'{' => {
                let mut m = Map::new();
                sc.object(|sc, k| {
                    let v = build(sc)?;
                    m.insert(k.into_owned(), v);
                    Some(true)
                })?;
                Some(Value::Object(m))
            }
            b'[' => {
                let mut items = Vec::new();
                sc.array(|sc| {
                    items.push(build(sc)?);
                    Some(())
                })?;
                Some(Value::Array(items))
            }
            b'"' => Some(Value::String(sc.string()?.into_owned())),
            _ => {
                let raw = sc.raw()?;
                Some(serde_json::from_str(raw).expect("a scalar the scanner accepted"))
            }
        }
    }

    /// Any top-level value through the scanner, then only whitespace.
    fn scan(text: &str) -> Option<Value> {
        let mut sc = Scanner::new(text);
        let v = build(&mut sc)?;
        sc.ws();
        (sc.i == text.len()).then_some(v)
    }

    /// The invariant: accepted only when `Value` accepts, and then equal;
    /// the skipping reader ([`read_object`] keeping nothing) accepts the
    /// same objects as the reading one.
    fn check(text: &str) -> Result<bool, TestCaseError> {
        let skipped = read_object(text, |_, _| Some(false)).is_some();
        let got = scan(text);
        let is_obj = text
            .trim_start_matches([' ', '\t', '\n', '\r'])
            .starts_with('{');
        prop_assert_eq!(skipped, is_obj && got.is_some(), "{:?}", text);
        let Some(got) = got else {
            return Ok(false);
        };
        let want = serde_json::from_str::<Value>(text);
        prop_assert!(want.is_ok(), "accepted what Value refuses: {:?}", text);
        prop_assert_eq!(got, want.unwrap(), "{:?}", text);
        Ok(true)
    }

    fn deep(n: usize) -> String {
        format!("{{\"v\":{}1{}}}", "[".repeat(n - 1), "]".repeat(n - 1))
    }

    #[test]
    fn accepts_only_what_value_accepts() {
        let declined = [
            r#"{"type":"a","n":1e400}"#.to_string(),
            r#"{"type":"a","n":-1e400}"#.into(),
            r#"{"type":"a","n":1e-400}"#.into(),
            r#"{"type":"a","n":1e100}"#.into(),
            r#"{"type":"a","n":1234567890123456789}"#.into(),
            r#"{"type":"a","n":18446744073709551616}"#.into(),
            r#"{"type":"a","s":"\ud83d"}"#.into(),
            r#"{"type":"a","s":"\ude00"}"#.into(),
            r#"{"type":"a","s":"\ud83d\u0041"}"#.into(),
            r#"{"type":"a","s":"\ud83dx"}"#.into(),
            r#"{"type":"a","\ud83d":1}"#.into(),
            r#"{"type":"a","s":"\x"}"#.into(),
            r#"{"type":"a","s":"\u12"}"#.into(),
            r#"{"type":"a","s":"\u12g4"}"#.into(),
            "{\"type\":\"a\",\"s\":\"tab\there\"}".into(),
            "{\"type\":\"a\",\"s\":\"nul\u{0}\"}".into(),
            "{\"type\":\"a\",\"s\":\"x\u{1f}\"}".into(),
            r#"{"type":"a"} x"#.into(),
            "{\"type\":\"a\"}\u{c}".into(),
            "{\"type\":\"a\"}\u{a0}".into(),
            r#"{"type":"a",}"#.into(),
            r#"{"type":"a",,"b":1}"#.into(),
            r#"{"a":[1,]}"#.into(),
            r#"{"a":[,1]}"#.into(),
            r#"{"a" 1}"#.into(),
            r#"{"a":01}"#.into(),
            r#"{"a":-}"#.into(),
            r#"{"a":1.}"#.into(),
            r#"{"a":.5}"#.into(),
            r#"{"a":1e}"#.into(),
            r#"{"a":+1}"#.into(),
            r#"{"a":tru}"#.into(),
            r#"{"a":nul}"#.into(),
            r#"{"a":truex}"#.into(),
            r#"{1:2}"#.into(),
            r#"{"a":1"#.into(),
            r#"{"a":"x"#.into(),
            r#"{"a":"x\"#.into(),
            r#"{"#.into(),
            "".into(),
            "   ".into(),
            r#"[1]"#.into(),
            r#""s""#.into(),
            "1".into(),
            format!("{{\"s\":\"{}\u{1}{}\"}}", "x".repeat(40), "y".repeat(40)),
            format!("{{\"s\":\"{}\u{1f}\"}}", "é".repeat(30)),
            format!("{{\"s\":\"{}\\q{}\"}}", "x".repeat(40), "y".repeat(40)),
            format!("{{\"s\":\"{}", "x".repeat(40)),
            deep(MAX_DEPTH + 1),
            deep(127),
            deep(129),
        ];
        for c in &declined {
            check(c).unwrap();
            assert!(
                read_object(c, |_, _| Some(false)).is_none(),
                "should decline {c:?}"
            );
        }
        let accepted = [
            r#"{"type":"a"}"#.to_string(),
            " \t\r\n{ \"type\" : \"a\" , \"b\" : [ 1 , { } , [ ] ] } \n\r\t".into(),
            r#"{}"#.into(),
            r#"{"type":"a","type":"b"}"#.into(),
            r#"{"n":[0,-0,-0.0,1.5,-7,123456789012345678,-123456789012345678,1e5,1E+5,2e-99,0.000001,1.25e99]}"#.into(),
            r#"{"n":3.14159265358979323846264338327950288419716939937510582097494459}"#.into(),
            r#"{"s":"a\nb \"q\" \\ \/ \b\f\r\t \u00e9 \u00E9 \u0000 \u001f \ud83d\ude00 \uD83D\uDE00 \uffff"}"#.into(),
            r#"{"typ\u0065":"x","\u0000":null,"é😀":true,"":false}"#.into(),
            "{\"s\":\"é😀\u{7f}\u{80}\u{7ff}\"}".into(),
            deep(MAX_DEPTH),
            format!("{{\"s\":\"{}\\n{}\\\"{}\"}}", "x".repeat(40), "é".repeat(40), "😀".repeat(9)),
            format!("{{\"{}\":\"{}\"}}", "k".repeat(17), "\u{7f}".repeat(33)),
        ];
        for c in &accepted {
            assert!(check(c).unwrap(), "should accept {c:?}");
        }
    }

    #[test]
    fn strings_borrow_unless_escaped() {
        let mut sc = Scanner::new(r#""abc""#);
        assert!(matches!(sc.string(), Some(Cow::Borrowed("abc"))));
        let mut sc = Scanner::new(r#""a\nc""#);
        assert!(matches!(sc.string(), Some(Cow::Owned(s)) if s == "a\nc"));
        let long = format!("\"{}\\\"{}\"", "x".repeat(40), "é".repeat(40));
        let mut sc = Scanner::new(&long);
        let want: String = serde_json::from_str(&long).unwrap();
        assert_eq!(sc.string().as_deref(), Some(want.as_str()));
    }

    #[test]
    fn lite_reads_strings_and_bools() {
        let mut sc = Scanner::new(r#"["x",true,false,null,1,{"a":[1]}]"#);
        let mut got = Vec::new();
        sc.array(|sc| {
            got.push(sc.lite()?);
            Some(())
        })
        .unwrap();
        assert_eq!(
            got,
            [
                Lite::Str("x".into()),
                Lite::Bool(true),
                Lite::Bool(false),
                Lite::Other,
                Lite::Other,
                Lite::Other
            ]
        );
        assert_eq!(got[0].as_str(), Some("x"));
        assert_eq!(got[1].as_bool(), Some(true));
        assert_eq!(got[2].clone().into_str(), None);
    }

    /// Pieces of JSON text, valid and not: structure, every escape (and
    /// broken ones), numbers of every shape, whitespace, control bytes.
    fn piece() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"",
            "\"\"",
            "\"k\"",
            "\"type\"",
            "\"a b\"",
            " ",
            "\t",
            "\n",
            "\r",
            "\u{c}",
            "\u{0}",
            "\u{1}",
            "\u{1f}",
            "\u{7f}",
            "é",
            "😀",
            "\u{a0}",
            "\\",
            "\\\"",
            "\\\\",
            "\\/",
            "\\b",
            "\\f",
            "\\n",
            "\\r",
            "\\t",
            "\\x",
            "\\u",
            "\\u0041",
            "\\u00e9",
            "\\u00E9",
            "\\u0000",
            "\\u001F",
            "\\uffff",
            "\\ud83d",
            "\\ude00",
            "\\uD83D\\uDE00",
            "\\udbff\\udfff",
            "\\ud800\\u0041",
            "\\u12",
            "\\u12g4",
            "0",
            "-0",
            "-",
            "1",
            "01",
            "7",
            "-7",
            "1.5",
            "1.",
            ".5",
            "1e5",
            "1E+5",
            "1e-5",
            "1e",
            "1e+",
            "1e400",
            "1e-400",
            "1e99",
            "1e100",
            "123456789012345678",
            "1234567890123456789",
            "18446744073709551616",
            "0.0",
            "-0.0",
            "2.5e-3",
            "true",
            "false",
            "null",
            "tru",
            "nul",
            "x",
        ])
    }

    /// A JSON-ish value: mostly well formed, with pieces thrown in.
    fn jsonish() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            piece().prop_map(str::to_string),
            prop::collection::vec(piece(), 0..6).prop_map(|p| format!("\"{}\"", p.concat())),
        ];
        leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec((inner.clone(), inner.clone()), 0..5).prop_map(|v| {
                    let f: Vec<String> = v
                        .into_iter()
                        .map(|(k, v)| {
                            let k = if k.starts_with('"') {
                                k
                            } else {
                                format!("\"{k}\"")
                            };
                            format!("{k}:{v}")
                        })
                        .collect();
                    format!("{{{}}}", f.join(","))
                }),
                prop::collection::vec(inner, 1..4).prop_map(|v| v.concat()),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn anything_accepted_is_what_value_reads(v in jsonish(), n in 0usize..130) {
            check(&v)?;
            check(&format!("{{\"k\":{v}}}"))?;
            check(&format!("{}{v}{}", "[".repeat(n), "]".repeat(n)))?;
        }

        #[test]
        fn token_soup_is_never_accepted_wrongly(p in prop::collection::vec(piece(), 0..24)) {
            check(&p.concat())?;
            check(&format!("{{\"s\":\"{}\"}}", p.concat()))?;
        }

        /// What serde_json writes (no floats: those it may write with long
        /// exponents) is accepted and read back equal.
        #[test]
        fn serde_output_is_accepted(v in value()) {
            let text = serde_json::to_string(&v).unwrap();
            prop_assert!(check(&text)?, "declined {}", text);
            let pretty = serde_json::to_string_pretty(&v).unwrap();
            prop_assert!(check(&pretty)?, "declined {}", pretty);
        }
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (-999_999_999_999_999_999i64..999_999_999_999_999_999).prop_map(Value::from),
            any::<String>().prop_map(Value::from),
            "[\"\\\\\u{0}-\u{1f}a-z]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
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
