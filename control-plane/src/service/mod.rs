//! What the control plane does, for every entry point alike (the REST API and the CLI):
//! keys (validation, create, roll, delete, verification through the cache), the audit
//! log and last-use tracking. Knows nothing of HTTP; its [`Error`] says what went wrong,
//! and each entry point says it in its own terms.

pub mod abuse;
pub mod assertion_keys;
pub mod audit;
pub mod console;
pub mod credits;
pub mod feed;
pub mod github_keys;
pub mod identities;
pub mod key_limits;
pub mod key_lists;
pub mod key_updates;
pub mod keys;
pub mod leaks;
pub mod meta;
pub mod policy;
pub mod seed;
pub mod usage;
pub mod verify;

use crate::db::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input breaks a rule (the message says which).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(&'static str),
    /// The caller's key is valid but its role may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// What is asked cannot be done in the state things are in (409): retire the newest
    /// assertion key, make a sixth.
    #[error("{0}")]
    Conflict(String),
    #[error("An API key with this name already exists")]
    DuplicateName,
    #[error("Maximum API Key Limit Reached: {0}. Consider deleting any that are not in use.")]
    LimitReached(u64),
    /// The database is down, saturated or timing out: retryable.
    #[error("the key store is unavailable; try again shortly")]
    Unavailable,
    /// The caller's source spent its failed-authentication budget (429).
    #[error(
        "too many failed authentications from this address; retry in {} s",
        .0.as_secs()
    )]
    TooManyFailures(std::time::Duration),
    /// Too many lookups of uncached keys at once (503): an overload, retryable.
    #[error("too many key lookups in flight; try again shortly")]
    Busy,
    /// The rate-limit counter (Redis) did not answer: the request is not let through
    /// uncounted (503).
    #[error("the rate-limit store is unavailable; try again shortly")]
    LimiterUnavailable,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl Error {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid(message.into())
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::DuplicateName => Error::DuplicateName,
            StoreError::LimitReached(max) => Error::LimitReached(max),
            StoreError::LastAdmin => Error::invalid(
                "this is the last admin key: create another admin key before deleting or \
                 disabling it (the CLI on the database can still delete it)",
            ),
            StoreError::RoleFixed(role) => Error::invalid(format!(
                "this key's role is {role}: a key's role is set once (only a legacy key, made \
                 before roles, can be given one)"
            )),
            e @ StoreError::NoTraffic(_) => Error::invalid(e.to_string()),
            e @ StoreError::NoCredits => Error::Conflict(e.to_string()),
            e @ StoreError::TooManyCredits => Error::invalid(e.to_string()),
            e @ StoreError::IdentityHasKeys(_) => Error::Conflict(e.to_string()),
            e @ StoreError::IdentityGone => Error::Conflict(e.to_string()),
            StoreError::Unavailable(e) => {
                tracing::warn!(error = %e, "key store unavailable");
                Error::Unavailable
            }
            StoreError::Other(e) => Error::Internal(e.into()),
        }
    }
}
