//! Integration tests: the real `kube-standin` binary, driven over HTTPS (and by the real
//! kubectl), checked against the API server behaviour cpha relies on.

mod auth;
mod crud;
mod events;
mod faults;
mod kube_rs;
mod kubectl;
mod persist;
mod rbac;
mod support;
mod watch;
