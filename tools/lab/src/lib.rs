//! cpha-lab: cpha's test and benchmark kit. It is not shipped with the agent.
//!
//! - [`netns`]: throw-away network namespaces, veth links and processes inside them, for the
//!   integration tests of the `cpha` crate and for the benchmark.
//! - [`server`]: the TCP servers the tests and the benchmark talk to (`serve`, `sink`, `source`).
//! - [`client`]: the load generators and checkers (`probe`, `stream`, `connect-loop`, `connrate`,
//!   `throughput`).
//! - [`https`]: the HTTPS clients (`https-loop`, `https-stream`, `http`) for end-to-end tests
//!   through HAProxy in front of the Kubernetes API stand-in, on [`http`] (a minimal HTTP/1.1
//!   client) and [`tls`] (rustls client configurations).
//! - [`report`]: the one-line JSON results the `cpha-lab` subcommands print, as typed values.
//! - [`bench`]: the benchmark that compares cpha's forward modes with socat and HAProxy.
//! - [`dur`], [`stop`]: small shared pieces (duration flags, SIGTERM/SIGINT as a flag).

pub mod bench;
pub mod client;
pub mod dur;
pub mod failover;
pub mod http;
pub mod https;
pub mod netns;
pub mod report;
pub mod server;
pub mod stop;
pub mod tls;
pub mod vrrp;

/// Panics with a clear message unless the process runs as root with `ip netns` usable.
///
/// Tests that need network namespaces call it first: they must fail loudly, never skip, when
/// run without the privileges they need.
#[macro_export]
macro_rules! require_root {
    () => {
        $crate::netns::require_root()
    };
}
