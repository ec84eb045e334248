//! Credits on client keys: the request and answer shapes (top-ups are key updates:
//! [`super::key_updates::add_credits`]). The control plane
//! keeps what was granted; the edge (the key's Durable Object) keeps what was spent —
//! see [`metlo_shared::credits`].

use metlo_shared::credits::{Grant, Refill, MAX_CREDITS};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Error;

/// A key's credits as set (at create, or by PATCH, which replaces them): the balance now,
/// and an optional refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credits {
    /// The balance: 0 to 1,000,000,000,000. Each request admitted at the edge spends 1.
    #[schema(maximum = 1_000_000_000_000_u64, example = 1000)]
    #[serde(deserialize_with = "metlo_shared::whole::number")]
    pub remaining: u64,
    /// Sets the balance to `amount` at each refill instant; absent or null: never.
    #[serde(default)]
    pub refill: Option<Refill>,
}

impl Credits {
    pub fn validate(self) -> Result<(u64, Option<Refill>), Error> {
        if self.remaining > MAX_CREDITS {
            return Err(Error::invalid(format!(
                "credits.remaining must be a whole number from 0 to {MAX_CREDITS}"
            )));
        }
        Ok((self.remaining, self.refill))
    }
}

/// A key's credits as the control plane knows them: what was granted. What is left is
/// counted at the edge, exactly, in the key's Durable Object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreditsInfo {
    /// The balance the last set gave, plus every top-up since.
    pub granted: u64,
    /// What was added since the last set.
    pub added: u64,
    pub refill: Option<Refill>,
}

impl From<Grant> for CreditsInfo {
    fn from(g: Grant) -> Self {
        CreditsInfo {
            granted: g.to.saturating_add(g.added),
            added: g.added,
            refill: g.refill,
        }
    }
}

/// `POST /api/v1/keys/{name}/credits`.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TopUp {
    /// Credits to add: 1 to 1,000,000,000,000.
    #[schema(minimum = 1, maximum = 1_000_000_000_000_u64, example = 500)]
    #[serde(deserialize_with = "metlo_shared::whole::number")]
    pub add: u64,
}

impl TopUp {
    /// The credits to add, if in range.
    pub fn validate(self) -> Result<u64, Error> {
        if (1..=MAX_CREDITS).contains(&self.add) {
            Ok(self.add)
        } else {
            Err(Error::invalid(format!(
                "add must be a whole number from 1 to {MAX_CREDITS}"
            )))
        }
    }
}
