//! What a run reports: the server's memory and CPU from /proc, latency histograms, and the
//! output (a readable table, then one JSON line).

use hdrhistogram::Histogram;

/// RSS and consumed CPU of a process.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    pub rss_kib: u64,
    pub cpu_secs: f64,
}

pub fn sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    Some(ProcSample {
        rss_kib,
        cpu_secs: cpu_secs(pid)?,
    })
}

/// utime + stime of a process (all its threads), in seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may contain spaces: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((utime + stime) as f64 / tck)
}

/// CPU seconds this process has used (the generator's own cost).
pub fn own_cpu_secs() -> f64 {
    cpu_secs(std::process::id()).unwrap_or(0.0)
}

/// Latencies in microseconds, 1 us to 100 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

pub fn record_latency(h: &mut Histogram<u64>, sent_ns: u64, now_ns: u64) {
    let us = now_ns.saturating_sub(sent_ns) / 1000;
    let _ = h.record(us.clamp(1, 100_000_000));
}

/// p50/p90/p99/p99.9/max in milliseconds.
pub fn latency_fields(h: &Histogram<u64>) -> Vec<(&'static str, serde_json::Value)> {
    let ms = |us: u64| serde_json::json!((us as f64 / 10.0).round() / 100.0);
    if h.is_empty() {
        return vec![("latency_samples", serde_json::json!(0))];
    }
    vec![
        ("latency_samples", serde_json::json!(h.len())),
        ("p50_ms", ms(h.value_at_quantile(0.5))),
        ("p90_ms", ms(h.value_at_quantile(0.9))),
        ("p99_ms", ms(h.value_at_quantile(0.99))),
        ("p999_ms", ms(h.value_at_quantile(0.999))),
        ("max_ms", ms(h.max())),
    ]
}

pub fn histogram_to_hex(h: &Histogram<u64>) -> String {
    use hdrhistogram::serialization::Serializer;
    let mut bytes = Vec::new();
    let _ = hdrhistogram::serialization::V2Serializer::new().serialize(h, &mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn histogram_from_hex(hex: &str) -> Option<Histogram<u64>> {
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect::<Option<_>>()?;
    hdrhistogram::serialization::Deserializer::new()
        .deserialize(&mut &bytes[..])
        .ok()
}

/// A run's results: printed as an aligned table, then as one JSON line.
pub struct Report {
    pub fields: Vec<(String, serde_json::Value)>,
}

impl Report {
    pub fn new(workload: &str, target: &str) -> Report {
        Report {
            fields: vec![
                ("workload".into(), serde_json::json!(workload)),
                ("target".into(), serde_json::json!(target)),
            ],
        }
    }

    pub fn add(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.fields.push((key.to_owned(), value.into()));
    }

    pub fn extend(&mut self, fields: Vec<(&'static str, serde_json::Value)>) {
        for (k, v) in fields {
            self.add(k, v);
        }
    }

    pub fn print(&self) {
        let width = self.fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in &self.fields {
            println!("  {k:width$}  {v}");
        }
        let map: serde_json::Map<String, serde_json::Value> = self.fields.iter().cloned().collect();
        println!("{}", serde_json::Value::Object(map));
    }
}

/// Rounds to 2 decimals for the report.
pub fn r2(v: f64) -> serde_json::Value {
    serde_json::json!((v * 100.0).round() / 100.0)
}
