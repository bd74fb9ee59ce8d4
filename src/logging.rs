//! The daemon's log drains: the human format (slog-term) or one JSON object per line
//! (`--log-format json`), both with each key once per line.
//!
//! slog hands a drain the record's own pairs and then every pair of the logger chain, so a key
//! set both by a logger and by a record (raft-rs logs `id` under a logger that has `id` too)
//! came out twice. [`fields`] keeps the first occurrence: the record's own value, then the
//! innermost logger's. The record's pairs come in the order they were written (slog serialises
//! them last first).

use std::fmt;
use std::io::Write;

use slog::{Drain, Key, OwnedKVList, Record, Serializer, KV};

/// How stderr lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `Dec 01 12:00:00.000 INFO message, key: value, ...`
    Human,
    /// `{"timestamp":"...","level":"INFO","message":"...","key":value,...}`
    Json,
}

/// A logged value, its type kept so that JSON numbers stay numbers.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    None,
}

/// Collects pairs, dropping a key already seen.
#[derive(Default)]
struct Collector(Vec<(Key, Value)>);

impl Collector {
    fn push(&mut self, key: Key, v: Value) -> slog::Result {
        if !self.0.iter().any(|(k, _)| *k == key) {
            self.0.push((key, v));
        }
        Ok(())
    }
}

macro_rules! emit_as {
    ($($name:ident: $t:ty => $variant:ident as $as:ty),* $(,)?) => {
        $(fn $name(&mut self, key: Key, v: $t) -> slog::Result {
            self.push(key, Value::$variant(v as $as))
        })*
    };
}

impl Serializer for Collector {
    fn emit_arguments(&mut self, key: Key, val: &fmt::Arguments<'_>) -> slog::Result {
        self.push(key, Value::Str(val.to_string()))
    }

    fn emit_str(&mut self, key: Key, val: &str) -> slog::Result {
        self.push(key, Value::Str(val.to_string()))
    }

    fn emit_bool(&mut self, key: Key, val: bool) -> slog::Result {
        self.push(key, Value::Bool(val))
    }

    fn emit_none(&mut self, key: Key) -> slog::Result {
        self.push(key, Value::None)
    }

    emit_as! {
        emit_u8: u8 => U64 as u64, emit_u16: u16 => U64 as u64, emit_u32: u32 => U64 as u64,
        emit_u64: u64 => U64 as u64, emit_usize: usize => U64 as u64,
        emit_i8: i8 => I64 as i64, emit_i16: i16 => I64 as i64, emit_i32: i32 => I64 as i64,
        emit_i64: i64 => I64 as i64, emit_isize: isize => I64 as i64,
        emit_f32: f32 => F64 as f64, emit_f64: f64 => F64 as f64,
    }
}

/// The pairs of one line, each key once (see the module doc).
pub fn fields(record: &Record<'_>, values: &OwnedKVList) -> Vec<(Key, Value)> {
    let mut own = Collector::default();
    // A serializer of ours never fails.
    let _ = record.kv().serialize(record, &mut own);
    own.0.reverse();
    let mut all = Collector::default();
    for (k, v) in own.0 {
        let _ = all.push(k, v);
    }
    let _ = values.serialize(record, &mut all);
    all.0
}

/// Pairs handed on to another drain as a record's own.
struct Fields(Vec<(Key, Value)>);

impl KV for Fields {
    fn serialize(&self, _: &Record<'_>, s: &mut dyn Serializer) -> slog::Result {
        for (k, v) in &self.0 {
            match v {
                Value::Str(x) => s.emit_str(k, x)?,
                Value::U64(x) => s.emit_u64(k, *x)?,
                Value::I64(x) => s.emit_i64(k, *x)?,
                Value::F64(x) => s.emit_f64(k, *x)?,
                Value::Bool(x) => s.emit_bool(k, *x)?,
                Value::None => s.emit_none(k)?,
            }
        }
        Ok(())
    }
}

/// Hands `inner` each record with its pairs deduplicated and no logger pairs.
pub struct Dedup<D> {
    inner: D,
    none: OwnedKVList,
}

impl<D> Dedup<D> {
    pub fn new(inner: D) -> Dedup<D> {
        Dedup {
            inner,
            none: OwnedKVList::from(slog::o!()),
        }
    }
}

impl<D: Drain> Drain for Dedup<D> {
    type Ok = D::Ok;
    type Err = D::Err;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<D::Ok, D::Err> {
        let kv = Fields(fields(record, values));
        let statics = slog::RecordStatic {
            location: record.location(),
            tag: record.tag(),
            level: record.level(),
        };
        let deduped = Record::new(&statics, record.msg(), slog::BorrowedKV(&kv));
        self.inner.log(&deduped, &self.none)
    }
}

/// Names of the fixed fields of a JSON line; a pair with one of these keys is written as
/// `field_<key>`.
const RESERVED: [&str; 3] = ["timestamp", "level", "message"];

/// One JSON object per line on `W`.
pub struct Json<W: Write> {
    out: std::sync::Mutex<W>,
}

impl<W: Write> Json<W> {
    pub fn new(out: W) -> Json<W> {
        Json {
            out: std::sync::Mutex::new(out),
        }
    }
}

/// The JSON line of a record (without the newline).
pub fn json_line(record: &Record<'_>, values: &OwnedKVList, timestamp: &str) -> String {
    let quote = |s: &str| serde_json::to_string(s).expect("a string serialises");
    let mut line = format!(
        "{{\"timestamp\":{},\"level\":{},\"message\":{}",
        quote(timestamp),
        quote(record.level().as_str()),
        quote(&record.msg().to_string())
    );
    for (k, v) in fields(record, values) {
        let key = if RESERVED.contains(&k) {
            quote(&format!("field_{k}"))
        } else {
            quote(k)
        };
        let value = match v {
            Value::Str(s) => quote(&s),
            Value::U64(n) => n.to_string(),
            Value::I64(n) => n.to_string(),
            Value::F64(x) => {
                serde_json::Number::from_f64(x).map_or("null".into(), |n| n.to_string())
            }
            Value::Bool(b) => b.to_string(),
            Value::None => "null".into(),
        };
        line.push(',');
        line.push_str(&key);
        line.push(':');
        line.push_str(&value);
    }
    line.push('}');
    line
}

/// The line of an error that stops the daemon, outside the logger (it may not exist yet).
pub fn fatal_json(message: &str) -> String {
    serde_json::json!({"timestamp": now_rfc3339(), "level": "CRITICAL", "message": message})
        .to_string()
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl<W: Write> Drain for Json<W> {
    type Ok = ();
    type Err = std::io::Error;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> std::io::Result<()> {
        let mut line = json_line(record, values, &now_rfc3339());
        line.push('\n');
        let mut out = self.out.lock().expect("log output lock");
        out.write_all(line.as_bytes())?;
        out.flush()
    }
}

/// The root logger on stderr with `format`, at `level` and above, with `values` on every line;
/// drop the guard to flush it.
pub fn stderr_logger(
    format: LogFormat,
    level: slog::Level,
    values: slog::OwnedKV<impl slog::SendSyncRefUnwindSafeKV + 'static>,
) -> (slog::Logger, slog_async::AsyncGuard) {
    let (drain, guard) = match format {
        LogFormat::Human => {
            let decorator = slog_term::TermDecorator::new().stderr().build();
            async_drain(Dedup::new(slog_term::FullFormat::new(decorator).build()).fuse())
        }
        LogFormat::Json => async_drain(Json::new(std::io::stderr()).fuse()),
    };
    let drain = slog::LevelFilter::new(drain, level).fuse();
    (slog::Logger::root(drain, values), guard)
}

fn async_drain<D>(d: D) -> (slog_async::Async, slog_async::AsyncGuard)
where
    D: Drain<Err = slog::Never, Ok = ()> + Send + 'static,
{
    slog_async::Async::new(d)
        .chan_size(4096)
        .overflow_strategy(slog_async::OverflowStrategy::Block)
        .build_with_guard()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Keeps what a drain is handed: the message and the keys of its pairs, in order.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<Logged>>>);

    /// A message and its keys.
    type Logged = (String, Vec<String>);

    impl Drain for Capture {
        type Ok = ();
        type Err = slog::Never;
        fn log(&self, r: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
            let mut keys = Vec::new();
            // Not deduplicated: every key the drain is handed.
            struct All<'a>(&'a mut Vec<String>);
            impl Serializer for All<'_> {
                fn emit_arguments(&mut self, k: Key, _: &fmt::Arguments<'_>) -> slog::Result {
                    self.0.push(k.to_string());
                    Ok(())
                }
            }
            let _ = r.kv().serialize(r, &mut All(&mut keys));
            let _ = values.serialize(r, &mut All(&mut keys));
            self.0.lock().unwrap().push((r.msg().to_string(), keys));
            Ok(())
        }
    }

    /// raft-rs logs `id` under a logger with `id`: the record's value is kept, once, and the
    /// record's pairs come in the order they were written.
    #[test]
    fn each_key_once_in_written_order() {
        let capture = Capture::default();
        let root = slog::Logger::root(Dedup::new(capture.clone()).fuse(), slog::o!("id" => 1));
        let raft = root.new(slog::o!("raft_id" => 1));
        slog::info!(raft, "RawNode created with id {}.", 2; "id" => 2, "a" => "x", "b" => 3);
        let got = capture.0.lock().unwrap().clone();
        assert_eq!(got[0].0, "RawNode created with id 2.");
        assert_eq!(got[0].1, ["id", "a", "b", "raft_id"]);
    }

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_keep_types_and_escape() {
        let out = Lines::default();
        let root = slog::Logger::root(Json::new(out.clone()).fuse(), slog::o!("id" => 7u64));
        let e = std::io::Error::other("disk \"full\"\nreally");
        slog::warn!(root, "write failed"; "error" => %e, "bytes" => 12u64, "ok" => false,
            "ratio" => 0.5, "delta" => -3i64, "message" => "clash", "id" => 8u64);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["level"], "WARNING");
        assert_eq!(v["message"], "write failed");
        assert_eq!(v["error"], "disk \"full\"\nreally");
        assert_eq!(v["bytes"], 12);
        assert_eq!(v["ok"], false);
        assert_eq!(v["ratio"], 0.5);
        assert_eq!(v["delta"], -3);
        assert_eq!(v["field_message"], "clash");
        assert_eq!(v["id"], 8);
        assert_eq!(text.matches("\"id\":").count(), 1);
        let ts = v["timestamp"].as_str().unwrap();
        assert!(
            ts.len() > 20 && ts.as_bytes()[10] == b'T' && ts.ends_with('Z'),
            "{ts}"
        );
    }
}
