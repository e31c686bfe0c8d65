//! Exit codes. cpha follows sysexits(3) so a systemd unit can tell a configuration error (do not
//! restart: `RestartPreventExitStatus=64 78`) from a transient failure (restart).

use crate::exec::ExecError;

/// Command line usage error.
pub const USAGE: u8 = 64;
/// The input is refused as data: `cpha members remove` of the last member, for instance.
pub const DATAERR: u8 = 65;
/// A program cpha needs is missing.
pub const UNAVAILABLE: u8 = 69;
/// A system error: a port in use, a failed system call.
pub const OSERR: u8 = 71;
/// Missing privilege (CAP_NET_ADMIN).
pub const NOPERM: u8 = 77;
/// Invalid configuration.
pub const CONFIG: u8 = 78;

/// An error that carries its own exit code. Raise it where the kind of failure is known; the
/// top of the program finds it anywhere in the chain.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Coded {
    pub code: u8,
    pub message: String,
}

impl Coded {
    pub fn usage(message: impl Into<String>) -> Self {
        Self { code: USAGE, message: message.into() }
    }
    pub fn config(message: impl Into<String>) -> Self {
        Self { code: CONFIG, message: message.into() }
    }
    pub fn noperm(message: impl Into<String>) -> Self {
        Self { code: NOPERM, message: message.into() }
    }
    pub fn oserr(message: impl Into<String>) -> Self {
        Self { code: OSERR, message: message.into() }
    }
}

/// The exit code for an error: the first coded error in the chain wins, else 1.
pub fn code_for(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(coded) = cause.downcast_ref::<Coded>() {
            return coded.code;
        }
        if let Some(exec) = cause.downcast_ref::<ExecError>() {
            match exec {
                ExecError::NotFound { .. } => return UNAVAILABLE,
                ExecError::PermissionDenied { .. } => return NOPERM,
                _ => {}
            }
        }
    }
    1
}
