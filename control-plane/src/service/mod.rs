//! What the control plane does, for every entry point alike (the REST API and the CLI):
//! keys (validation, create, roll, delete, verification through the cache), the audit
//! log and last-use tracking. Knows nothing of HTTP; its [`Error`] says what went wrong,
//! and each entry point says it in its own terms.

pub mod audit;
pub mod keys;
pub mod usage;

use crate::db::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input breaks a rule (the message says which).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("An API key with this name already exists")]
    DuplicateName,
    #[error("Maximum API Key Limit Reached: {0}. Consider deleting any that are not in use.")]
    LimitReached(u64),
    /// The database is down, saturated or timing out: retryable.
    #[error("the key store is unavailable; try again shortly")]
    Unavailable,
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
            StoreError::Unavailable(e) => {
                tracing::warn!(error = %e, "key store unavailable");
                Error::Unavailable
            }
            StoreError::Other(e) => Error::Internal(e.into()),
        }
    }
}
