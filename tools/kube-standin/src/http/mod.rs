//! HTTP plumbing: listeners, TLS, response bodies, content negotiation and routing.

pub mod body;
pub mod negotiate;
pub mod router;
pub mod server;
