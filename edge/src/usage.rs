//! Key use seen by this isolate, reported to the control plane in batches (each key's
//! latest use, for `lastUsed`, how many requests it made, and how many were refused and
//! why, for the hourly counts by outcome): at most one report per `USAGE_REPORT_MS` per
//! isolate, sent after the response (`waitUntil`), never on a request's path.

use std::collections::HashMap;

use metlo_shared::KeyHash;

/// The control plane takes at most this many entries per report.
pub const MAX_REPORT_ENTRIES: usize = 1000;
/// The control plane's largest report (its `http::limits::MAX_REPORT_BYTES`): a batch of
/// [`MAX_REPORT_ENTRIES`] keys, each admitted and refused for every reason, always fits.
pub const MAX_REPORT_BYTES: usize = 512 * 1024;
/// The largest count the control plane takes per key and report (its
/// `service::usage::MAX_REPORTED_COUNT`); larger ones are reported as this.
pub const MAX_REPORTED_COUNT: u64 = 1_000_000_000;

/// Why a request of a known key was refused, as reported ([`Outcome::NAMES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    RateLimited,
    CreditsExhausted,
    /// The route policy refused it (403).
    Forbidden,
    /// The revocation feed refused it (disabled, revoked).
    Disabled,
    Expired,
}

impl Outcome {
    /// The report's field names, in the order of [`Use::refused`].
    pub const NAMES: [&'static str; 5] = [
        "rateLimited",
        "creditsExhausted",
        "forbidden",
        "disabled",
        "expired",
    ];
}

/// A key's use in a report: its latest admitted request (ms; 0: none since the last
/// report), how many were admitted, how many were refused by [`Outcome`] and the latest
/// refusal (ms).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Use {
    pub hash: Option<KeyHash>,
    pub last_ms: u64,
    pub count: u64,
    pub refused: [u64; 5],
    pub refused_ms: u64,
}

impl Use {
    fn add(&mut self, other: &Use) {
        self.last_ms = self.last_ms.max(other.last_ms);
        self.count += other.count;
        for (mine, theirs) in self.refused.iter_mut().zip(other.refused) {
            *mine += theirs;
        }
        self.refused_ms = self.refused_ms.max(other.refused_ms);
    }
}

pub struct UsageBuffer {
    /// What happened since the last report, per key.
    pending: HashMap<KeyHash, Use>,
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
        self.note(hash, now_ms, None);
    }

    /// A request with this key was let through (`None`) or refused at `now_ms`.
    pub fn note(&mut self, hash: KeyHash, now_ms: u64, refused: Option<Outcome>) {
        if self.interval_ms == 0 {
            return;
        }
        let entry = self.pending.entry(hash).or_insert(Use {
            hash: Some(hash),
            ..Use::default()
        });
        match refused {
            None => {
                entry.last_ms = entry.last_ms.max(now_ms);
                entry.count += 1;
            }
            Some(outcome) => {
                entry.refused[outcome as usize] += 1;
                entry.refused_ms = entry.refused_ms.max(now_ms);
            }
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
        let all: Vec<Use> = self.pending.drain().map(|(_, u)| u).collect();
        Some(all.chunks(MAX_REPORT_ENTRIES).map(<[_]>::to_vec).collect())
    }

    /// A batch whose report failed: kept for the next one (later uses win, counts add
    /// up). A report that timed out after the control plane took it is counted twice:
    /// uses are never lost, rarely counted twice.
    pub fn put_back(&mut self, batch: Vec<Use>) {
        for u in batch {
            if let Some(hash) = u.hash {
                self.pending
                    .entry(hash)
                    .or_insert(Use {
                        hash: Some(hash),
                        ..Use::default()
                    })
                    .add(&u);
            }
        }
    }
}

/// The body of `POST /api/v1/usage` for a batch:
/// `{"used":{"<sha256 hex>":<ms>,…},"counts":{"<sha256 hex>":<n>,…},
/// "refused":{"<sha256 hex>":{"at":<ms>,"rateLimited":<n>,…},…}}` (keys admitted in
/// `used` and `counts`, keys refused in `refused`, each field only when not 0).
/// Written by hand: building a `serde_json::Value` would add kilobytes to the wasm.
pub fn report_body(batch: &[Use]) -> String {
    let mut body = String::with_capacity(40 + batch.len() * 200);
    let admitted = || batch.iter().filter(|u| u.count > 0);
    for (field, counts) in [(r#"{"used":{"#, false), (r#"},"counts":{"#, true)] {
        body.push_str(field);
        for (n, u) in admitted().enumerate() {
            if n > 0 {
                body.push(',');
            }
            push_hash(&mut body, u);
            let n = if counts {
                u.count.min(MAX_REPORTED_COUNT)
            } else {
                u.last_ms
            };
            body.push_str(&n.to_string());
        }
    }
    body.push_str(r#"},"refused":{"#);
    for (n, u) in batch.iter().filter(|u| u.refused_ms > 0).enumerate() {
        if n > 0 {
            body.push(',');
        }
        push_hash(&mut body, u);
        body.push_str(r#"{"at":"#);
        body.push_str(&u.refused_ms.to_string());
        for (name, count) in Outcome::NAMES.iter().zip(u.refused) {
            if count > 0 {
                body.push_str(",\"");
                body.push_str(name);
                body.push_str("\":");
                body.push_str(&count.min(MAX_REPORTED_COUNT).to_string());
            }
        }
        body.push('}');
    }
    body.push_str("}}");
    body
}

/// `"<hash>":`
fn push_hash(body: &mut String, u: &Use) {
    body.push('"');
    if let Some(hash) = u.hash {
        body.push_str(&hash.to_hex());
    }
    body.push_str("\":");
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
        let mut batch: Vec<_> = batches[0]
            .iter()
            .map(|u| (u.hash.unwrap(), u.last_ms, u.count))
            .collect();
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
        let first = batches[2][0].hash.unwrap();
        u.seen(first, 1500);
        u.note(first, 1600, Some(Outcome::Expired));
        let again = u.due(2000).unwrap();
        assert_eq!(again[0].len(), 500);
        let merged = again[0].iter().find(|x| x.hash == Some(first)).unwrap();
        assert_eq!(
            (merged.last_ms, merged.count),
            (1500, 2),
            "the use put back counts too"
        );
        assert_eq!((merged.refused[4], merged.refused_ms), (1, 1600));
    }

    #[test]
    fn off_records_nothing() {
        let mut u = UsageBuffer::new(0, 0);
        u.seen(hash(), 10);
        assert!(u.due(1_000_000).is_none());
    }

    #[test]
    fn body_is_what_the_control_plane_takes() {
        let (a, b, c) = (hash(), hash(), hash());
        let mut u = UsageBuffer::new(1, 0);
        for _ in 0..3 {
            u.seen(a, 42);
        }
        u.seen(b, 7);
        u.note(b, 9, Some(Outcome::RateLimited));
        u.note(c, 11, Some(Outcome::CreditsExhausted));
        u.note(c, 12, Some(Outcome::CreditsExhausted));
        u.note(c, 10, Some(Outcome::Forbidden));
        let batch = u.due(100).unwrap().remove(0);
        let body: serde_json::Value = serde_json::from_str(&report_body(&batch)).unwrap();
        assert_eq!(body["used"][a.to_hex()], 42);
        assert_eq!(body["used"][b.to_hex()], 7);
        assert_eq!(body["counts"][a.to_hex()], 3);
        assert_eq!(body["counts"][b.to_hex()], 1);
        assert!(
            body["used"].get(c.to_hex()).is_none(),
            "refused only: not a use"
        );
        assert_eq!(
            body["refused"][b.to_hex()],
            serde_json::json!({"at": 9, "rateLimited": 1})
        );
        assert_eq!(
            body["refused"][c.to_hex()],
            serde_json::json!({"at": 12, "creditsExhausted": 2, "forbidden": 1})
        );
        let empty: serde_json::Value = serde_json::from_str(&report_body(&[])).unwrap();
        assert_eq!(empty["used"].as_object().unwrap().len(), 0);
        assert_eq!(empty["counts"].as_object().unwrap().len(), 0);
    }

    /// The largest batch, every key admitted and refused for every reason with counts past
    /// the control plane's cap: within its size limit, counts capped.
    #[test]
    fn a_full_batch_fits_the_control_planes_limit() {
        let batch: Vec<Use> = (0..MAX_REPORT_ENTRIES)
            .map(|_| Use {
                hash: Some(hash()),
                last_ms: 9_999_999_999_999,
                count: u64::MAX,
                refused: [u64::MAX; 5],
                refused_ms: 9_999_999_999_999,
            })
            .collect();
        let body = report_body(&batch);
        assert!(body.len() <= MAX_REPORT_BYTES, "{} bytes", body.len());
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        let refused = body["refused"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap();
        assert_eq!(refused["expired"], MAX_REPORTED_COUNT);
        let counts = body["counts"].as_object().unwrap().values().next().unwrap();
        assert_eq!(*counts, MAX_REPORTED_COUNT);
    }
}
