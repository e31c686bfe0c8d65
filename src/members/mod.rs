//! Control-plane members: the kube-apiserver addresses HAProxy's backend must hold.
//!
//! Operators write the list into a ConfigMap value, a file or a flag; [`parse`] turns it into a
//! [`MemberSet`] or refuses it whole. A member is an IPv4 address, an IPv6 address or an RFC 1123
//! DNS name, a port (6443 unless written) and an HAProxy server name (written as `name=address`
//! or derived from the address).
//!
//! NOTE: everything that reaches haproxy.cfg or the HAProxy Runtime API is rendered from parsed
//! values ([`Member`]'s `Display`, [`ServerName`], [`Host`]), never from the operator's text, and the
//! grammar refuses any character outside `[A-Za-z0-9._:[]=-]` before looking further. A newline
//! (a `program` section run as root), a `;` (a second Runtime API command) or a `#` cannot get
//! through, and error messages quote entries escaped so a log line cannot be forged either.
//!
//! - `member`: one entry, its canonical text and its server name;
//! - `parse`: the list shapes (YAML or plain), options and the list errors;
//! - `set`: the canonical set, its uniqueness rules, serde form and [`MemberSet::diff`];
//! - `edit`: `cpha members add/remove`, one member added to (replacing the entries with its name
//!   or its address) or removed from the ConfigMap with an optimistic-concurrency update.

pub mod edit;
mod member;
mod parse;
mod set;
pub mod source;

#[cfg(test)]
mod proptests;

pub use member::{
    Address, DnsName, Host, Member, MemberParseError, ServerName, DEFAULT_PORT, MAX_ENTRY_LEN, MAX_SERVER_NAME_LEN,
};
pub use parse::{parse, MembersError, ParseOptions, MAX_INPUT_BYTES};
pub use set::{AddressChange, MemberDiff, MemberSet};
