//! What the accept loop and the key check learn about a request, carried as one
//! extension: the TCP peer (set by the accept loop, `server.rs`) and, once a key or a
//! console session is verified, the caller. One entry rather than one each: beside
//! axum's own (the matched path, the path parameters), a fourth grew every request's
//! extension map — a rehash and two more boxes per request.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::Extensions;
use metlo_shared::KeyRecord;

#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub peer: Option<SocketAddr>,
    pub caller: Option<Arc<KeyRecord>>,
    /// A console session's request that did not give the session's key again (in
    /// `X-Metlo-Confirm-Key`): it may not mint admin or edge secrets.
    pub unconfirmed_session: bool,
}

impl RequestContext {
    /// A request's context as the accept loop starts it.
    pub fn from_peer(peer: SocketAddr) -> Self {
        RequestContext {
            peer: Some(peer),
            caller: None,
            unconfirmed_session: false,
        }
    }

    pub fn peer(extensions: &Extensions) -> Option<SocketAddr> {
        extensions.get::<RequestContext>()?.peer
    }

    pub fn caller(extensions: &Extensions) -> Option<&Arc<KeyRecord>> {
        extensions.get::<RequestContext>()?.caller.as_ref()
    }

    pub fn unconfirmed_session(extensions: &Extensions) -> bool {
        extensions
            .get::<RequestContext>()
            .is_some_and(|c| c.unconfirmed_session)
    }

    /// Marks a console session's request that did not give its key again (after
    /// [`Self::set_caller`]).
    pub fn set_unconfirmed_session(extensions: &mut Extensions) {
        if let Some(context) = extensions.get_mut::<RequestContext>() {
            context.unconfirmed_session = true;
        }
    }

    /// Records the verified caller (in a new context if the request came without one).
    pub fn set_caller(extensions: &mut Extensions, caller: Arc<KeyRecord>) {
        match extensions.get_mut::<RequestContext>() {
            Some(context) => context.caller = Some(caller),
            None => {
                extensions.insert(RequestContext {
                    peer: None,
                    caller: Some(caller),
                    unconfirmed_session: false,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caller_joins_the_peer_in_one_entry() {
        let peer: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let mut extensions = Extensions::new();
        extensions.insert(RequestContext::from_peer(peer));
        assert!(RequestContext::caller(&extensions).is_none());
        let record = Arc::new(KeyRecord::sample());
        RequestContext::set_caller(&mut extensions, record.clone());
        assert_eq!(RequestContext::peer(&extensions), Some(peer));
        assert_eq!(RequestContext::caller(&extensions), Some(&record));
        assert_eq!(extensions.len(), 1);

        let mut bare = Extensions::new();
        RequestContext::set_caller(&mut bare, record.clone());
        assert_eq!(RequestContext::peer(&bare), None);
        assert_eq!(RequestContext::caller(&bare), Some(&record));
    }
}
