//! The edge Worker. Not built yet: it will parse and hash keys with `metlo_shared`,
//! look them up in Workers KV and proxy good requests to the origin (DESIGN §4).
