//! Turning histograms and counts into the human summary, the `--json`
//! document and the histogram files a plotting script reads.

use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// The percentiles every latency is reported at, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Percentiles {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest value.
    pub max: u64,
}

impl Percentiles {
    /// Reads the percentiles of `h` (all zero when empty).
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }

    /// One line: `p50 812 µs  p90 1.20 ms  ...  (n = 1000)`.
    pub fn line(&self) -> String {
        if self.count == 0 {
            return "no samples".into();
        }
        format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n = {})",
            fmt_us(self.p50),
            fmt_us(self.p90),
            fmt_us(self.p99),
            fmt_us(self.p999),
            fmt_us(self.max),
            self.count
        )
    }

    /// The JSON object: microseconds.
    pub fn json(&self) -> Value {
        json!({
            "count": self.count,
            "p50_us": self.p50,
            "p90_us": self.p90,
            "p99_us": self.p99,
            "p999_us": self.p999,
            "max_us": self.max,
        })
    }
}

/// A latency in microseconds, in the unit that reads best.
pub fn fmt_us(us: u64) -> String {
    match us {
        0..=999 => format!("{us} µs"),
        1_000..=999_999 => format!("{:.2} ms", us as f64 / 1e3),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

/// A count with thousands separators: `1,234,567`.
pub fn fmt_count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate with thousands separators and no decimals: `12,345/s`.
pub fn fmt_rate(per_sec: f64) -> String {
    format!("{}/s", fmt_count(per_sec.round().max(0.0) as u64))
}

/// The histogram as a percentile distribution table in the format of
/// HdrHistogram's `outputPercentileDistribution` (values in milliseconds),
/// which HdrHistogram's plotter and most scripts read.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if !h.is_empty() {
        for v in h.iter_quantiles(5) {
            let q = v.quantile_iterated_to();
            let inverse = if q < 1.0 {
                format!("{:>14.2}", 1.0 / (1.0 - q))
            } else {
                format!("{:>14}", "")
            };
            let _ = writeln!(
                out,
                "{:>12.3} {:>2.12} {:>10} {}",
                v.value_iterated_to() as f64 / 1e3,
                q,
                v.count_since_last_iteration(),
                inverse
            );
        }
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / 1e3,
        h.stdev() / 1e3
    );
    let _ = writeln!(
        out,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.max() as f64 / 1e3,
        h.len()
    );
    out
}

/// Writes `<dir>/<name>.hgrm` (percentile table) and `<dir>/<name>.hlog`
/// (an HdrHistogram interval log holding one V2-deflate histogram covering
/// the run, values in microseconds).
pub fn write_hist_files(
    dir: &Path,
    name: &str,
    h: &Histogram<u64>,
    started: SystemTime,
    length: Duration,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
    let hgrm_path = dir.join(format!("{name}.hgrm"));
    std::fs::write(&hgrm_path, hgrm(h))
        .map_err(|e| format!("cannot write `{}`: {e}", hgrm_path.display()))?;
    let hlog_path = dir.join(format!("{name}.hlog"));
    let mut buf = Vec::new();
    {
        let mut serializer = V2DeflateSerializer::new();
        let mut writer = IntervalLogWriterBuilder::new()
            .add_comment(&format!("codi-loadgen {name}: latency in microseconds"))
            .with_start_time(started)
            .with_base_time(started)
            .with_max_value_divisor(1.0)
            .begin_log_with(&mut buf, &mut serializer)
            .map_err(|e| format!("cannot start histogram log: {e}"))?;
        writer
            .write_histogram(h, Duration::ZERO, length, None)
            .map_err(|e| format!("cannot serialize histogram: {e}"))?;
    }
    std::fs::File::create(&hlog_path)
        .and_then(|mut f| f.write_all(&buf))
        .map_err(|e| format!("cannot write `{}`: {e}", hlog_path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::new_hist;

    #[test]
    fn units_and_separators() {
        assert_eq!(fmt_us(0), "0 µs");
        assert_eq!(fmt_us(999), "999 µs");
        assert_eq!(fmt_us(1_500), "1.50 ms");
        assert_eq!(fmt_us(2_345_678), "2.35 s");
        assert_eq!(fmt_count(0), "0");
        assert_eq!(fmt_count(999), "999");
        assert_eq!(fmt_count(1_000), "1,000");
        assert_eq!(fmt_count(1_234_567), "1,234,567");
        assert_eq!(fmt_rate(12_345.6), "12,346/s");
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = new_hist();
        for v in 1..=1000 {
            h.record(v).unwrap();
        }
        let p = Percentiles::of(&h);
        assert_eq!(
            (p.count, p.p50, p.p90, p.p99, p.max),
            (1000, 500, 900, 990, 1000)
        );
        assert_eq!(p.p999, 999);
        assert!(p.line().starts_with("p50 500 µs  p90 900 µs  p99 990 µs"));
        assert_eq!(p.json()["p99_us"], 990);
        assert_eq!(Percentiles::of(&new_hist()).line(), "no samples");
    }

    #[test]
    fn histogram_files_are_readable() {
        let mut h = new_hist();
        for v in [100, 200, 300, 40_000] {
            h.record(v).unwrap();
        }
        let table = hgrm(&h);
        let rows: Vec<Vec<f64>> = table
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.contains("Value"))
            .map(|l| {
                l.split_whitespace()
                    .take(3)
                    .map(|f| f.parse().unwrap())
                    .collect()
            })
            .collect();
        assert_eq!(rows.first().unwrap()[0], 0.1, "first value in ms");
        assert_eq!(rows.last().unwrap()[1], 1.0, "ends at percentile 1");
        assert_eq!(rows.iter().map(|r| r[2]).sum::<f64>(), 4.0, "counts add up");
        assert!(table.contains("Total count    =            4"));

        let dir = tempfile::tempdir().unwrap();
        write_hist_files(
            dir.path(),
            "ack",
            &h,
            SystemTime::now(),
            Duration::from_secs(1),
        )
        .unwrap();
        let log = std::fs::read(dir.path().join("ack.hlog")).unwrap();
        let mut deserializer = hdrhistogram::serialization::Deserializer::new();
        let mut read = 0;
        for entry in hdrhistogram::serialization::interval_log::IntervalLogIterator::new(&log) {
            if let Ok(hdrhistogram::serialization::interval_log::LogEntry::Interval(i)) = entry {
                let bytes = base64_decode(i.encoded_histogram());
                let back: Histogram<u64> = deserializer.deserialize(&mut bytes.as_slice()).unwrap();
                assert_eq!(back, h);
                read += 1;
            }
        }
        assert_eq!(read, 1);
    }

    /// Standard base64 without padding checks (test helper).
    fn base64_decode(s: &str) -> Vec<u8> {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let mut acc = 0u32;
        let mut bits = 0;
        for c in s.bytes().filter(|&c| c != b'=') {
            acc = (acc << 6) | A.iter().position(|&a| a == c).unwrap() as u32;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        out
    }
}
