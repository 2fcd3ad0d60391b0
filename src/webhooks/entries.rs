//! Reading Redis stream replies (`XREADGROUP`, `XAUTOCLAIM`, `XINFO`) in RESP2 or RESP3 form.
//! Redis is input like any other: anything of an unexpected shape is left out, never trusted.

pub use crate::cluster::state::text as string_of;
use redis::Value;

/// One stream entry: its id and its fields (name, value).
pub type StreamEntry = (String, Vec<(String, String)>);

/// An integer reply, or a string holding one.
pub fn int_of(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        other => string_of(other)?.parse().ok(),
    }
}

/// A map (RESP3) or a flat list of pairs (RESP2).
pub fn pairs_of(value: &Value) -> Vec<(String, &Value)> {
    match value {
        Value::Map(pairs) => pairs
            .iter()
            .filter_map(|(k, v)| Some((string_of(k)?, v)))
            .collect(),
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|pair| match pair {
                [k, v] => Some((string_of(k)?, v)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The entries of an `XREADGROUP` reply, per stream key.
pub fn streams_of(reply: &Value) -> Vec<(String, Vec<StreamEntry>)> {
    let streams: Vec<(String, &Value)> = match reply {
        Value::Map(_) => pairs_of(reply),
        Value::Array(items) => items
            .iter()
            .filter_map(|item| match item {
                Value::Array(kv) if kv.len() == 2 => Some((string_of(&kv[0])?, &kv[1])),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let read = |(key, entries): (String, &Value)| match entries {
        Value::Array(entries) => Some((key, entries_of(entries))),
        _ => None,
    };
    streams.into_iter().filter_map(read).collect()
}

/// Stream entries: `[id, [field, value, ...]]` each (a deleted one, with no fields, is left out).
pub fn entries_of(entries: &[Value]) -> Vec<StreamEntry> {
    let entry = |value: &Value| {
        let Value::Array(parts) = value else {
            return None;
        };
        let (id, fields) = (string_of(parts.first()?)?, parts.get(1)?);
        let fields = pairs_of(fields)
            .into_iter()
            .filter_map(|(f, v)| Some((f, string_of(v)?)))
            .collect();
        Some((id, fields))
    };
    entries.iter().filter_map(entry).collect()
}

/// An `XAUTOCLAIM` reply: the cursor to go on from ("0-0": done) and the entries claimed.
pub fn claimed_of(reply: &Value) -> (Option<String>, Vec<StreamEntry>) {
    let Value::Array(parts) = reply else {
        return (None, Vec::new());
    };
    let cursor = parts.first().and_then(string_of);
    let entries = match parts.get(1) {
        Some(Value::Array(entries)) => entries_of(entries),
        _ => Vec::new(),
    };
    (cursor, entries)
}
