//! Key use seen by this isolate, reported to the control plane in batches (each key's
//! latest use, for `lastUsed`, and how many requests it made, for the hourly counts): at
//! most one report per `USAGE_REPORT_MS` per isolate, sent after the response
//! (`waitUntil`), never on a request's path.

use std::collections::HashMap;

use metlo_shared::KeyHash;

/// The control plane takes at most this many entries per report.
pub const MAX_REPORT_ENTRIES: usize = 1000;

/// A key's use in a report: (hash, latest use in ms, requests).
pub type Use = (KeyHash, u64, u64);

pub struct UsageBuffer {
    /// Latest use and requests since the last report, per key.
    pending: HashMap<KeyHash, (u64, u64)>,
    interval_ms: u64,
    last_report_ms: u64,
}

impl UsageBuffer {
    /// `interval_ms` 0: usage is not recorded.
    pub fn new(interval_ms: u64, now_ms: u64) -> Self {
        UsageBuffer {
            pending: HashMap::new(),
            interval_ms,
            last_report_ms: now_ms,
        }
    }

    /// A request with this key was let through at `now_ms`.
    pub fn seen(&mut self, hash: KeyHash, now_ms: u64) {
        if self.interval_ms > 0 {
            let (last, count) = self.pending.entry(hash).or_insert((now_ms, 0));
            *last = (*last).max(now_ms);
            *count += 1;
        }
    }

    /// The batches to report now, if a report is due (and there is something to say).
    pub fn due(&mut self, now_ms: u64) -> Option<Vec<Vec<Use>>> {
        if self.interval_ms == 0
            || self.pending.is_empty()
            || now_ms.saturating_sub(self.last_report_ms) < self.interval_ms
        {
            return None;
        }
        self.last_report_ms = now_ms;
        let all: Vec<Use> = self.pending.drain().map(|(h, (t, n))| (h, t, n)).collect();
        Some(all.chunks(MAX_REPORT_ENTRIES).map(<[_]>::to_vec).collect())
    }

    /// A batch whose report failed: kept for the next one (later uses win, requests add
    /// up). A report that timed out after the control plane took it is counted twice:
    /// uses are never lost, rarely counted twice.
    pub fn put_back(&mut self, batch: Vec<Use>) {
        for (hash, at, n) in batch {
            let (last, count) = self.pending.entry(hash).or_insert((at, 0));
            *last = (*last).max(at);
            *count += n;
        }
    }
}

/// The body of `POST /api/v1/usage` for a batch:
/// `{"used":{"<sha256 hex>":<ms>,…},"counts":{"<sha256 hex>":<n>,…}}`.
/// Written by hand: building a `serde_json::Value` would add kilobytes to the wasm.
pub fn report_body(batch: &[Use]) -> String {
    let mut body = String::with_capacity(24 + batch.len() * 160);
    for (field, i) in [(r#"{"used":{"#, 0), (r#"},"counts":{"#, 1)] {
        body.push_str(field);
        for (n, (hash, at, count)) in batch.iter().enumerate() {
            if n > 0 {
                body.push(',');
            }
            body.push('"');
            body.push_str(&hash.to_hex());
            body.push_str("\":");
            body.push_str(&if i == 0 { *at } else { *count }.to_string());
        }
    }
    body.push_str("}}");
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use metlo_shared::ApiKey;

    fn hash() -> KeyHash {
        ApiKey::generate().unwrap().hash()
    }

    #[test]
    fn reports_at_most_once_per_interval_with_the_latest_use() {
        let (a, b) = (hash(), hash());
        let mut u = UsageBuffer::new(1000, 0);
        u.seen(a, 10);
        u.seen(a, 20);
        u.seen(b, 15);
        assert!(u.due(999).is_none(), "not before the interval");
        let batches = u.due(1000).expect("due");
        assert_eq!(batches.len(), 1);
        let mut batch = batches[0].clone();
        batch.sort_by_key(|(_, t, _)| *t);
        assert_eq!(batch, vec![(b, 15, 1), (a, 20, 2)]);
        u.seen(a, 1001);
        assert!(u.due(1500).is_none(), "one report per interval");
        assert!(u.due(2000).is_some());
        assert!(u.due(5000).is_none(), "nothing to report");
    }

    #[test]
    fn failed_reports_are_kept_and_big_ones_split() {
        let mut u = UsageBuffer::new(1000, 0);
        let hashes: Vec<KeyHash> = (0..2500).map(|_| hash()).collect();
        for h in &hashes {
            u.seen(*h, 5);
        }
        let batches = u.due(1000).unwrap();
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![1000, 1000, 500]
        );
        u.put_back(batches[2].clone());
        u.seen(batches[2][0].0, 1500);
        let again = u.due(2000).unwrap();
        assert_eq!(again[0].len(), 500);
        assert!(
            again[0].contains(&(batches[2][0].0, 1500, 2)),
            "the use put back counts too"
        );
    }

    #[test]
    fn off_records_nothing() {
        let mut u = UsageBuffer::new(0, 0);
        u.seen(hash(), 10);
        assert!(u.due(1_000_000).is_none());
    }

    #[test]
    fn body_is_what_the_control_plane_takes() {
        let (a, b) = (hash(), hash());
        let body: serde_json::Value =
            serde_json::from_str(&report_body(&[(a, 42, 3), (b, 7, 1)])).unwrap();
        assert_eq!(body["used"][a.to_hex()], 42);
        assert_eq!(body["used"][b.to_hex()], 7);
        assert_eq!(body["counts"][a.to_hex()], 3);
        assert_eq!(body["counts"][b.to_hex()], 1);
        let empty: serde_json::Value = serde_json::from_str(&report_body(&[])).unwrap();
        assert_eq!(empty["used"].as_object().unwrap().len(), 0);
        assert_eq!(empty["counts"].as_object().unwrap().len(), 0);
    }
}
