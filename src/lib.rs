//! cpha: a highly available Kubernetes control-plane endpoint with HAProxy, from the first boot.
//!
//! The crate is organised by domain:
//! - [`forward`]: the bootstrap forward (nftables, iptables or a userspace proxy) from the
//!   load-balancer address to an apiserver.
//! - [`agent`]: `cpha run`, the loop that joins everything: member updates in, HAProxy applies
//!   and the forward/HAProxy handover out.
//! - [`haproxy`]: haproxy.cfg rendering, validation, Runtime API applies, reloads, read-back.
//! - [`kube`]: credentials and the Kubernetes client (also straight to the members).
//! - [`config`]: the agent's YAML configuration, composed from each domain's section.
//! - [`cli`]: one file per subcommand; each parses its flags and calls into the domain modules.
//! - [`members`]: control-plane member sets parsed strictly from what operators write; [`yaml`]
//!   is the one module that reads YAML.
//! - [`exec`], [`exit`], [`fsutil`], [`logging`], [`metrics`], [`notify`], [`sysinfo`]: process
//!   plumbing, atomic files, metrics and host facts shared by everything else.

pub mod agent;
pub mod build_info;
pub mod cli;
pub mod config;
pub mod exec;
pub mod exit;
pub mod forward;
pub mod fsutil;
pub mod haproxy;
pub mod kube;
pub mod logging;
pub mod members;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod secret;
pub mod signals;
pub mod sysinfo;
pub mod template;
#[cfg(test)]
mod testutil;
pub mod units;
pub mod vip;
pub mod yaml;
