//! Credits: a balance a key spends at the edge, with an optional refill.
//!
//! Two halves, one authority each. The control plane owns what was *granted*: a
//! [`Grant`] in the key's record says the value last set (`to`, under the set's sequence
//! number `set`), the credits added since (`added`, only ever growing) and the refill
//! rule. The key's Durable Object owns what was *spent*: a [`Balance`] that applies
//! grants idempotently — a record read twice, late or out of order never adds twice —
//! and refills on schedule. So a top-up is one atomic `added + n` on the control plane
//! and is counted exactly once wherever the record travels.
//!
//! A refill sets the balance to the rule's `amount` (credits do not accumulate across
//! refills, as in Unkey) at each refill instant: every day at 00:00 UTC, every month on
//! `refillDay` at 00:00 UTC (the month's last day when it is shorter), or every
//! `periodSeconds` seconds counted from the Unix epoch.

use serde::{Deserialize, Serialize};

/// The largest balance, value set, top-up or refill amount.
pub const MAX_CREDITS: u64 = 1_000_000_000_000;
/// The longest refill period in seconds: a year.
pub const MAX_REFILL_SECONDS: u32 = 31_536_000;

/// When credits refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    Daily,
    Monthly,
    Seconds,
}

/// A refill rule. `refillDay` only with `monthly` (1–31, default 1); `periodSeconds`
/// only and always with `seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields, try_from = "RawRefill")]
pub struct Refill {
    /// The balance after each refill: 1 to 1,000,000,000,000.
    #[cfg_attr(
        feature = "utoipa",
        schema(minimum = 1, maximum = 1_000_000_000_000_u64, example = 1000)
    )]
    pub amount: u64,
    pub interval: Interval,
    /// `monthly` only: the day of the month (1–31; the month's last day when shorter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "utoipa", schema(minimum = 1, maximum = 31))]
    pub refill_day: Option<u8>,
    /// `seconds` only (and required there): every this many seconds from the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "utoipa", schema(minimum = 1, maximum = 31_536_000))]
    pub period_seconds: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRefill {
    #[serde(deserialize_with = "crate::whole::number")]
    amount: u64,
    interval: Interval,
    #[serde(default, deserialize_with = "crate::whole::optional")]
    refill_day: Option<u8>,
    #[serde(default, deserialize_with = "crate::whole::optional")]
    period_seconds: Option<u32>,
}

impl TryFrom<RawRefill> for Refill {
    type Error = CreditsError;

    fn try_from(r: RawRefill) -> Result<Self, CreditsError> {
        Refill::new(r.amount, r.interval, r.refill_day, r.period_seconds)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CreditsError {
    #[error("credit amounts must be whole numbers from 0 to {MAX_CREDITS} (a refill's from 1)")]
    Amount,
    #[error("refillDay (1 to 31) is only for a monthly refill")]
    RefillDay,
    #[error("periodSeconds (1 to {MAX_REFILL_SECONDS}) is required for, and only for, a refill every N seconds")]
    Period,
}

impl Refill {
    pub fn new(
        amount: u64,
        interval: Interval,
        refill_day: Option<u8>,
        period_seconds: Option<u32>,
    ) -> Result<Self, CreditsError> {
        if !(1..=MAX_CREDITS).contains(&amount) {
            return Err(CreditsError::Amount);
        }
        let day_ok = match (interval, refill_day) {
            (Interval::Monthly, Some(d)) => (1..=31).contains(&d),
            (_, None) => true,
            (_, Some(_)) => false,
        };
        if !day_ok {
            return Err(CreditsError::RefillDay);
        }
        let period_ok = match (interval, period_seconds) {
            (Interval::Seconds, Some(p)) => (1..=MAX_REFILL_SECONDS).contains(&p),
            (Interval::Seconds, None) | (_, Some(_)) => false,
            (_, None) => true,
        };
        if !period_ok {
            return Err(CreditsError::Period);
        }
        Ok(Refill {
            amount,
            interval,
            refill_day,
            period_seconds,
        })
    }

    /// The number of the refill period `now` (Unix seconds) falls in: it grows by one at
    /// each refill instant.
    pub fn period(&self, now: u64) -> u64 {
        match self.interval {
            Interval::Daily => now / 86_400,
            Interval::Seconds => now / u64::from(self.period_seconds.unwrap_or(1)),
            Interval::Monthly => {
                let (y, m, d) = civil_from_days(now / 86_400);
                let months = y * 12 + m - 1;
                if d >= self.day_in(y, m) {
                    months
                } else {
                    months - 1
                }
            }
        }
    }

    /// The Unix second of the next refill after `now`.
    pub fn next(&self, now: u64) -> u64 {
        match self.interval {
            Interval::Daily => (now / 86_400 + 1) * 86_400,
            Interval::Seconds => {
                let p = u64::from(self.period_seconds.unwrap_or(1));
                (now / p + 1) * p
            }
            Interval::Monthly => {
                let months = self.period(now) + 1;
                let (y, m) = (months / 12, months % 12 + 1);
                days_from_civil(y, m, self.day_in(y, m)) * 86_400
            }
        }
    }

    /// The refill day in month `m` of year `y`: `refillDay`, or the month's last day.
    fn day_in(&self, y: u64, m: u64) -> u64 {
        let last = match m {
            2 if y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400)) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        u64::from(self.refill_day.unwrap_or(1)).min(last)
    }
}

/// Year, month (1–12), day (1–31) of a day counted from 1970-01-01 (Howard Hinnant's
/// algorithm, for dates from 1970 on).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + u64::from(m <= 2), m, d)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// What the control plane granted, as the key's record carries it: in text
/// ([`Grant::encode`]), which the Worker reads with a few lines of code rather than a
/// JSON deserializer per struct (its bundle has a budget).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The sequence number of the last time the credits were set (grows with each set).
    pub set: u64,
    /// The balance that set gave.
    pub to: u64,
    /// Credits added since that set.
    pub added: u64,
    pub refill: Option<Refill>,
}

impl Grant {
    /// `set/to/added/kind/amount/arg`: `kind` 0 no refill, 1 daily, 2 monthly (`arg` the
    /// day), 3 every `arg` seconds.
    pub fn encode(&self) -> String {
        let (kind, amount, arg) = match self.refill {
            None => (0, 0, 0),
            Some(r) => match r.interval {
                Interval::Daily => (1, r.amount, 0),
                Interval::Monthly => (2, r.amount, r.refill_day.unwrap_or(1).into()),
                Interval::Seconds => (3, r.amount, r.period_seconds.unwrap_or(1)),
            },
        };
        format!(
            "{}/{}/{}/{kind}/{amount}/{arg}",
            self.set, self.to, self.added
        )
    }

    /// The grant in [`Grant::encode`]'s text; `None` for anything else (a set of 0 too).
    pub fn decode(text: &str) -> Option<Grant> {
        let mut n = text.split('/').map(str::parse::<u64>);
        let mut next = || n.next()?.ok();
        let (set, to, added, kind, amount, arg) =
            (next()?, next()?, next()?, next()?, next()?, next()?);
        if next().is_some() || set == 0 || to > MAX_CREDITS || added > MAX_CREDITS {
            return None;
        }
        let refill = match kind {
            0 => None,
            1 => Some(Refill::new(amount, Interval::Daily, None, None).ok()?),
            2 => {
                let day = u8::try_from(arg).ok()?;
                Some(Refill::new(amount, Interval::Monthly, Some(day), None).ok()?)
            }
            3 => {
                let secs = u32::try_from(arg).ok()?;
                Some(Refill::new(amount, Interval::Seconds, None, Some(secs)).ok()?)
            }
            _ => return None,
        };
        Some(Grant {
            set,
            to,
            added,
            refill,
        })
    }
}

impl Serialize for Grant {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.encode())
    }
}

impl<'de> Deserialize<'de> for Grant {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Grant::decode(&text).ok_or_else(|| serde::de::Error::custom("not a credit grant"))
    }
}

/// What the key's Durable Object keeps: the balance and which grant and refill period it
/// already counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Balance {
    pub set: u64,
    pub added: u64,
    pub period: u64,
    pub remaining: u64,
}

impl Balance {
    /// Brings the balance up to date with `grant` and the clock (`now`, Unix seconds):
    /// a newer set replaces it, a new refill period sets it to the refill amount, then a
    /// larger `added` adds the difference once (a top-up the object first sees after a
    /// refill instant counts: it is never wiped by a refill it may have followed), and an
    /// older grant changes nothing.
    pub fn apply(&mut self, grant: &Grant, now: u64) {
        let period = grant.refill.map_or(0, |r| r.period(now));
        if grant.set > self.set {
            *self = Balance {
                set: grant.set,
                added: grant.added,
                period,
                remaining: grant.to.saturating_add(grant.added).min(MAX_CREDITS),
            };
            return;
        }
        if grant.set != self.set {
            return;
        }
        if let Some(refill) = grant.refill {
            if period > self.period {
                self.remaining = refill.amount;
                self.period = period;
            }
        }
        if grant.added > self.added {
            self.remaining = (self.remaining + (grant.added - self.added)).min(MAX_CREDITS);
            self.added = grant.added;
        }
    }

    /// Which pool credits taken now come from: credits given back count only into the
    /// same pool (after a set or a refill they would be counted twice).
    pub fn pool(&self) -> (u64, u64) {
        (self.set, self.period)
    }

    /// Storage form: `set:added:period:remaining`.
    pub fn encode(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.set, self.added, self.period, self.remaining
        )
    }

    /// The stored balance; a fresh one (which the next grant sets) for anything else.
    pub fn decode(stored: &str) -> Balance {
        let mut parts = stored.split(':').map(str::parse::<u64>);
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(Ok(set)), Some(Ok(added)), Some(Ok(period)), Some(Ok(remaining)), None) => {
                Balance {
                    set,
                    added,
                    period,
                    remaining,
                }
            }
            _ => Balance::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refill(amount: u64, interval: Interval, day: Option<u8>, secs: Option<u32>) -> Refill {
        Refill::new(amount, interval, day, secs).unwrap()
    }

    #[test]
    fn refill_rules_are_checked() {
        assert_eq!(
            Refill::new(0, Interval::Daily, None, None),
            Err(CreditsError::Amount)
        );
        assert_eq!(
            Refill::new(1, Interval::Daily, Some(3), None),
            Err(CreditsError::RefillDay)
        );
        assert_eq!(
            Refill::new(1, Interval::Monthly, Some(32), None),
            Err(CreditsError::RefillDay)
        );
        assert_eq!(
            Refill::new(1, Interval::Seconds, None, None),
            Err(CreditsError::Period)
        );
        assert_eq!(
            Refill::new(1, Interval::Daily, None, Some(5)),
            Err(CreditsError::Period)
        );
        let parsed: Result<Refill, _> =
            serde_json::from_str(r#"{"amount":5,"interval":"seconds","periodSeconds":0}"#);
        assert!(parsed.is_err());
        let parsed: Result<Refill, _> = serde_json::from_str(r#"{"amount":5,"interval":"weekly"}"#);
        assert!(parsed.is_err());
        let ok: Refill =
            serde_json::from_str(r#"{"amount":5,"interval":"monthly","refillDay":31}"#).unwrap();
        assert_eq!(ok.refill_day, Some(31));
    }

    #[test]
    fn calendar_round_trips() {
        for days in (0..200_000).step_by(7) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        // 2024-02-29
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn refill_instants() {
        let t = 1_706_745_600; // 2024-02-01T00:00:00Z
        let daily = refill(5, Interval::Daily, None, None);
        assert_eq!(daily.next(t), t + 86_400);
        assert_eq!(daily.period(t + 86_399), daily.period(t));
        assert_eq!(daily.period(t + 86_400), daily.period(t) + 1);
        let every = refill(5, Interval::Seconds, None, Some(30));
        assert_eq!(every.next(t + 1), t + 30);
        // Day 31 in February 2024 is the 29th; then March 31st.
        let monthly = refill(5, Interval::Monthly, Some(31), None);
        let feb29 = t + 28 * 86_400;
        assert_eq!(monthly.next(t), feb29);
        assert_eq!(monthly.period(feb29 - 1) + 1, monthly.period(feb29));
        assert_eq!(monthly.next(feb29), 1_711_843_200); // 2024-03-31
        let first = refill(5, Interval::Monthly, None, None);
        assert_eq!(first.next(t), 1_709_251_200); // 2024-03-01
        assert_eq!(first.period(t), first.period(1_709_251_199));
    }

    #[test]
    fn grants_travel_as_text() {
        for refill in [
            None,
            Some(refill(5, Interval::Daily, None, None)),
            Some(refill(5, Interval::Monthly, Some(15), None)),
            Some(refill(5, Interval::Seconds, None, Some(30))),
        ] {
            let g = Grant {
                set: 3,
                to: 100,
                added: 7,
                refill,
            };
            assert_eq!(Grant::decode(&g.encode()), Some(g));
        }
        for bad in [
            "",
            "0/1/0/0/0/0",
            "1/1/0/4/1/1",
            "1/1/0/3/1/0",
            "1/1/0/0/0/0/0",
            "1/x/0/0/0/0",
        ] {
            assert_eq!(Grant::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn grants_apply_once_in_any_order() {
        let now = 1_000;
        let g = |set, to, added| Grant {
            set,
            to,
            added,
            refill: None,
        };
        let mut b = Balance::default();
        b.apply(&g(1, 100, 0), now);
        assert_eq!(b.remaining, 100);
        b.remaining -= 30;
        b.apply(&g(1, 100, 50), now);
        b.apply(&g(1, 100, 50), now);
        b.apply(&g(1, 100, 20), now); // an older record, read late
        assert_eq!(b.remaining, 120);
        b.apply(&g(2, 7, 0), now);
        assert_eq!(b.remaining, 7);
        b.apply(&g(1, 100, 900), now); // from before the set: ignored
        assert_eq!(b.remaining, 7);
        assert_eq!(Balance::decode(&b.encode()), b);
        assert_eq!(Balance::decode("1:2:3"), Balance::default());
    }

    #[test]
    fn refills_set_the_amount_once_per_period() {
        let rule = refill(10, Interval::Seconds, None, Some(60));
        let grant = Grant {
            set: 1,
            to: 3,
            added: 0,
            refill: Some(rule),
        };
        let mut b = Balance::default();
        b.apply(&grant, 600);
        assert_eq!(b.remaining, 3, "a set starts within its period");
        b.remaining = 0;
        b.apply(&grant, 659);
        assert_eq!(b.remaining, 0);
        b.apply(&grant, 660);
        assert_eq!(b.remaining, 10);
        b.remaining = 4;
        b.apply(&grant, 700);
        assert_eq!(b.remaining, 4);
        // A top-up the object first sees after a refill instant is not wiped by it.
        let topped = Grant {
            added: 500,
            ..grant
        };
        b.apply(&topped, 720);
        assert_eq!(b.remaining, 10 + 500);
    }
}
