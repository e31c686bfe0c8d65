//! cpha: a highly available Kubernetes control-plane endpoint with HAProxy, from the first boot.
//!
//! The crate is organised by domain:
//! - [`forward`]: the bootstrap forward (nftables, iptables or a userspace proxy) from the
//!   load-balancer address to an apiserver.
//! - [`cli`]: one file per subcommand; each parses its flags and calls into the domain modules.
//! - [`members`]: control-plane member sets parsed strictly from what operators write; [`yaml`]
//!   is the one module that reads YAML.
//! - [`exec`], [`exit`], [`logging`], [`notify`], [`sysinfo`]: process plumbing and host facts
//!   shared by everything else.

pub mod cli;
pub mod exec;
pub mod exit;
pub mod forward;
pub mod logging;
pub mod members;
pub mod notify;
pub mod sysinfo;
pub mod yaml;
