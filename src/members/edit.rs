//! `cpha members add` and `remove`: one member added to or removed from the member ConfigMap,
//! as an optimistic-concurrency update. An added member replaces the entries that share its name
//! or its address (a rebuilt host, a reused address), and says which.
//!
//! The decision is pure ([`plan`]: the ConfigMap's current text and the edit in, the new set and
//! what it replaced, or "nothing to do", out), so it is tested with plain values; [`apply`] wraps it in the API's
//! read-modify-write loop: GET, decide, PUT with the resourceVersion read (or POST when the
//! ConfigMap does not exist), and on 409 Conflict / AlreadyExists read again and decide again.
//! Two hosts registering at once both end up listed: the loser's PUT is refused and it retries
//! on top of the winner's list.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};

use super::member::{quoted, Member, ServerName};
use super::parse::{parse, MembersError, ParseOptions};
use super::set::MemberSet;

/// Most read-modify-write rounds before giving up; each loses only to another writer's success.
pub const MAX_ATTEMPTS: u32 = 10;

/// One edit of the list, parsed before any request is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// `NAME=ADDRESS[:PORT]`: the name is required, so the member can be removed by it later.
    Add(Member),
    /// A server name.
    Remove(ServerName),
}

impl Edit {
    /// Reads `cpha members add ENTRY` with the one member grammar; the entry must name the member.
    pub fn add(entry: &str, default_port: u16) -> Result<Edit, EditError> {
        let member = Member::parse(entry, default_port)
            .map_err(|reason| EditError::InvalidEntry { entry: entry.to_owned(), reason: reason.to_string() })?;
        if !member.has_explicit_name() {
            // NOTE: only a parsed entry gets here, so it holds no character that could forge a line.
            return Err(EditError::Unnamed { entry: entry.to_owned() });
        }
        Ok(Edit::Add(member))
    }

    /// Reads `cpha members remove NAME`.
    pub fn remove(name: &str) -> Result<Edit, EditError> {
        name.parse::<ServerName>()
            .map(Edit::Remove)
            .map_err(|reason| EditError::InvalidName { name: name.to_owned(), reason: reason.to_string() })
    }
}

impl fmt::Display for Edit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Edit::Add(m) => write!(f, "add {m}"),
            Edit::Remove(n) => write!(f, "remove {n}"),
        }
    }
}

/// Why an edit is refused. Nothing is written in any of these cases.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("{} is not a member: {reason}", quoted(entry))]
    InvalidEntry { entry: String, reason: String },
    #[error("{} names no server: write NAME=ADDRESS[:PORT], e.g. cp2={entry}", quoted(entry))]
    Unnamed { entry: String },
    #[error("{} is not a server name: {reason}", quoted(name))]
    InvalidName { name: String, reason: String },
    #[error("the ConfigMap's current list is invalid, so it is left as it is (fix it first): {0}")]
    CurrentInvalid(MembersError),
    #[error("{name} is the last member: removing it would leave HAProxy with no apiserver")]
    LastMember { name: String },
    #[error("the list would have {count} members, more than {max} (members.maxMembers)")]
    TooMany { count: usize, max: usize },
}

/// What an edit does to the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The list already says so: nothing is written.
    Unchanged(&'static str),
    /// The new list, and the entries an added member replaced.
    Write { members: MemberSet, replaced: Vec<Replaced> },
}

/// An entry that an added member took the place of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    pub member: Member,
    pub why: ReplacedWhy,
}

/// What the replaced entry shared with the added member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplacedWhy {
    /// The same server name at another address: the host was rebuilt under its old name.
    SameName,
    /// The same address under another name: a new host was given a released address.
    SameAddress,
}

impl fmt::Display for Replaced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.why {
            ReplacedWhy::SameName => "the same name",
            ReplacedWhy::SameAddress => "the same address",
        };
        write!(f, "{}={} ({why})", self.member.name(), self.member.address())
    }
}

/// Decides an edit on the list as the ConfigMap holds it (`None`: no ConfigMap or no key).
///
/// Adding `NAME=ADDRESS` replaces the entry named NAME and the entry at ADDRESS, when they differ
/// from it: a host registers what it is now, and an entry that says otherwise about its name or
/// its address is out of date (a rebuilt host, or a removed host whose address was handed out
/// again). The two can be two entries, both replaced by the one added.
pub fn plan(current: Option<&str>, edit: &Edit, opts: &ParseOptions) -> Result<Plan, EditError> {
    let set = match current {
        None => MemberSet::new(),
        Some(text) => {
            // The same rules the agent reads with, except that an empty list is something to add to.
            let lenient = ParseOptions { allow_empty: true, ..opts.clone() };
            parse(text, &lenient).map_err(EditError::CurrentInvalid)?
        }
    };
    match edit {
        Edit::Add(member) => {
            if set.contains(member) {
                return Ok(Plan::Unchanged("already listed"));
            }
            let replaced: Vec<Replaced> = set
                .iter()
                .filter_map(|m| {
                    let why = if m.name() == member.name() {
                        ReplacedWhy::SameName
                    } else if m.same_address(member) {
                        ReplacedWhy::SameAddress
                    } else {
                        return None;
                    };
                    Some(Replaced { member: m.clone(), why })
                })
                .collect();
            let count = set.len() - replaced.len() + 1;
            if count > opts.max_members {
                return Err(EditError::TooMany { count, max: opts.max_members });
            }
            let kept = set.iter().filter(|m| !replaced.iter().any(|r| &r.member == *m));
            let members =
                MemberSet::from_members(kept.cloned().chain([member.clone()])).map_err(EditError::CurrentInvalid)?;
            Ok(Plan::Write { members, replaced })
        }
        Edit::Remove(name) => {
            if set.get(name.as_str()).is_none() {
                return Ok(Plan::Unchanged("not listed"));
            }
            if set.len() == 1 && !opts.allow_empty {
                return Err(EditError::LastMember { name: name.to_string() });
            }
            let members = MemberSet::from_members(set.iter().filter(|m| m.name() != name).cloned())
                .map_err(EditError::CurrentInvalid)?;
            Ok(Plan::Write { members, replaced: Vec::new() })
        }
    }
}

/// The ConfigMap value for a set: one canonical `NAME=ADDRESS:PORT` entry per line, every
/// entry named so that `remove NAME` can find it.
pub fn render(set: &MemberSet) -> String {
    set.iter().map(|m| format!("{}={}\n", m.name(), m.address())).collect()
}

/// Where the list lives.
#[derive(Debug, Clone)]
pub struct Target {
    pub namespace: String,
    pub name: String,
    pub key: String,
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Unchanged { why: &'static str, members: MemberSet },
    Created { members: MemberSet },
    Updated { members: MemberSet, replaced: Vec<Replaced>, attempts: u32 },
}

/// A failed edit: refused (nothing written, exit 65) or the API failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Refused(#[from] EditError),
    #[error("{what}: {source}")]
    Api { what: String, source: kube::Error },
    #[error("gave up after {attempts} attempts: every write met a newer version of {object} (409 Conflict)")]
    Contended { attempts: u32, object: String },
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// The read-modify-write loop against the API. The edit is decided again on every round from
/// what the server holds then.
#[tracing::instrument(skip_all, fields(configmap = %format!("{}/{}", target.namespace, target.name), %edit), err)]
pub async fn apply(
    client: kube::Client,
    target: &Target,
    edit: &Edit,
    opts: &ParseOptions,
) -> Result<Applied, ApplyError> {
    let api: Api<ConfigMap> = Api::namespaced(client, &target.namespace);
    let object = format!("ConfigMap {}/{}", target.namespace, target.name);
    for attempt in 1..=MAX_ATTEMPTS {
        let current = api
            .get_opt(&target.name)
            .await
            .map_err(|source| ApplyError::Api { what: format!("reading {object}"), source })?;
        let text = current.as_ref().and_then(|cm| cm.data.as_ref()).and_then(|d| d.get(&target.key)).cloned();
        let (members, replaced) = match plan(text.as_deref(), edit, opts)? {
            Plan::Unchanged(why) => {
                let members = match text.as_deref() {
                    Some(t) => parse(t, &ParseOptions { allow_empty: true, ..opts.clone() }).unwrap_or_default(),
                    None => MemberSet::new(),
                };
                return Ok(Applied::Unchanged { why, members });
            }
            Plan::Write { members, replaced } => (members, replaced),
        };
        let value = render(&members);
        let result = match current {
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(target.name.clone()),
                        namespace: Some(target.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    data: Some(BTreeMap::from([(target.key.clone(), value)])),
                    ..ConfigMap::default()
                };
                api.create(&PostParams::default(), &cm).await.map(|_| Applied::Created { members })
            }
            Some(mut cm) => {
                // The resourceVersion read stays in the object: the PUT is refused with 409 if
                // anyone wrote in between.
                cm.data.get_or_insert_with(BTreeMap::new).insert(target.key.clone(), value);
                cm.metadata.managed_fields = None;
                api.replace(&target.name, &PostParams::default(), &cm).await.map(|_| Applied::Updated {
                    members,
                    replaced,
                    attempts: attempt,
                })
            }
        };
        match result {
            Ok(applied) => return Ok(applied),
            Err(e) if is_conflict(&e) => {
                tracing::info!(attempt, "{object} changed meanwhile ({}); reading it again", kube_reason(&e));
                // A little spread so racing writers do not meet again at once.
                let jitter = u64::from(std::process::id() % 7) * 15 + u64::from(attempt) * 20;
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            Err(source) => return Err(ApplyError::Api { what: format!("writing {object}"), source }),
        }
    }
    Err(ApplyError::Contended { attempts: MAX_ATTEMPTS, object })
}

fn kube_reason(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} {}", s.code, s.reason),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;

    fn opts() -> ParseOptions {
        ParseOptions::default()
    }

    fn add(entry: &str) -> Edit {
        Edit::add(entry, 6443).unwrap()
    }

    fn written(p: Plan) -> String {
        match p {
            Plan::Write { members, replaced } => {
                assert_eq!(replaced, [], "nothing should be replaced");
                render(&members)
            }
            Plan::Unchanged(why) => panic!("unchanged: {why}"),
        }
    }

    /// The new text and what it replaced, as `Display` shows it.
    fn replacing(p: Plan) -> (String, Vec<String>) {
        match p {
            Plan::Write { members, replaced } => (render(&members), replaced.iter().map(ToString::to_string).collect()),
            Plan::Unchanged(why) => panic!("unchanged: {why}"),
        }
    }

    #[test]
    fn entries_are_parsed_strictly_and_must_be_named() {
        assert!(matches!(Edit::add("cp2=192.0.2.12", 6443), Ok(Edit::Add(m)) if m.port() == 6443));
        let e = Edit::add("192.0.2.12:6443", 6443).unwrap_err();
        assert!(e.to_string().contains("names no server: write NAME=ADDRESS[:PORT]"), "{e}");
        let e = Edit::add("cp2=192.0.2.12:6443\nprogram x", 6443).unwrap_err();
        assert!(matches!(e, EditError::InvalidEntry { .. }), "{e}");
        assert!(!e.to_string().contains('\n'), "the message quotes the newline: {e}");
        let e = Edit::add("cp2=0.0.0.0:6443", 6443).unwrap_err();
        assert!(matches!(e, EditError::InvalidEntry { .. }), "an unusable address: {e}");
        let e = Edit::remove("cp 2").unwrap_err();
        assert!(e.to_string().contains("cp 2"), "the refusal names the entry: {e}");
        assert!(Edit::remove("cp2").is_ok());
    }

    #[test]
    fn add_creates_appends_and_is_idempotent() {
        assert_eq!(written(plan(None, &add("cp1=192.0.2.11:6443"), &opts()).unwrap()), "cp1=192.0.2.11:6443\n");
        let one = "cp1=192.0.2.11:6443\n";
        assert_eq!(
            written(plan(Some(one), &add("cp2=192.0.2.12"), &opts()).unwrap()),
            "cp1=192.0.2.11:6443\ncp2=192.0.2.12:6443\n"
        );
        assert_eq!(plan(Some(one), &add("cp1=192.0.2.11:6443"), &opts()).unwrap(), Plan::Unchanged("already listed"));
        // An operator's own spelling (a YAML list, no names) is read and written back canonical.
        assert_eq!(
            written(plan(Some("- 192.0.2.11\n"), &add("cp2=192.0.2.12"), &opts()).unwrap()),
            "m-192.0.2.11-6443=192.0.2.11:6443\ncp2=192.0.2.12:6443\n"
        );
        assert_eq!(written(plan(Some(""), &add("cp1=192.0.2.11"), &opts()).unwrap()), "cp1=192.0.2.11:6443\n");
    }

    const THREE: &str = "cp1=192.0.2.11:6443\ncp2=192.0.2.12:6443\ncp3=192.0.2.13:6443\n";

    #[test]
    fn add_with_a_listed_name_replaces_its_address() {
        // A host rebuilt under its old name, with a new address.
        let (text, replaced) = replacing(plan(Some(THREE), &add("cp2=192.0.2.99"), &opts()).unwrap());
        assert_eq!(text, "cp1=192.0.2.11:6443\ncp3=192.0.2.13:6443\ncp2=192.0.2.99:6443\n");
        assert_eq!(replaced, ["cp2=192.0.2.12:6443 (the same name)"]);
        // Another port is another address too.
        let (text, replaced) = replacing(plan(Some(THREE), &add("cp1=192.0.2.11:7443"), &opts()).unwrap());
        assert_eq!(text, "cp1=192.0.2.11:7443\ncp2=192.0.2.12:6443\ncp3=192.0.2.13:6443\n");
        assert_eq!(replaced, ["cp1=192.0.2.11:6443 (the same name)"]);
    }

    #[test]
    fn add_with_a_listed_address_replaces_its_entry() {
        // A new host given the address a removed one had.
        let (text, replaced) = replacing(plan(Some(THREE), &add("cp4=192.0.2.12:6443"), &opts()).unwrap());
        assert_eq!(text, "cp1=192.0.2.11:6443\ncp4=192.0.2.12:6443\ncp3=192.0.2.13:6443\n");
        assert_eq!(replaced, ["cp2=192.0.2.12:6443 (the same address)"]);
        // An entry with a derived name is replaced the same way.
        let (text, replaced) =
            replacing(plan(Some("- 192.0.2.11\n- 192.0.2.12\n"), &add("cp4=192.0.2.12"), &opts()).unwrap());
        assert_eq!(text, "m-192.0.2.11-6443=192.0.2.11:6443\ncp4=192.0.2.12:6443\n");
        assert_eq!(replaced, ["m-192.0.2.12-6443=192.0.2.12:6443 (the same address)"]);
    }

    #[test]
    fn add_can_replace_two_entries_with_one() {
        // cp3 is rebuilt at the address cp1 had: both stale entries go, one takes their place.
        let (text, replaced) = replacing(plan(Some(THREE), &add("cp3=192.0.2.11"), &opts()).unwrap());
        assert_eq!(text, "cp3=192.0.2.11:6443\ncp2=192.0.2.12:6443\n");
        assert_eq!(replaced, ["cp1=192.0.2.11:6443 (the same address)", "cp3=192.0.2.13:6443 (the same name)"]);
        // The count after the replacement is what the cap is checked on.
        let full = ParseOptions { max_members: 3, ..opts() };
        let (text, _) = replacing(plan(Some(THREE), &add("cp3=192.0.2.11"), &full).unwrap());
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn a_registration_run_again_changes_nothing() {
        let (text, _) = replacing(plan(Some(THREE), &add("cp3=192.0.2.11"), &opts()).unwrap());
        assert_eq!(plan(Some(&text), &add("cp3=192.0.2.11"), &opts()).unwrap(), Plan::Unchanged("already listed"));
        // In any spelling of the same member.
        assert_eq!(plan(Some(&text), &add("cp3=192.0.2.11:6443"), &opts()).unwrap(), Plan::Unchanged("already listed"));
        assert_eq!(plan(Some(THREE), &add("cp2=192.0.2.12:6443"), &opts()).unwrap(), Plan::Unchanged("already listed"));
    }

    #[test]
    fn add_refuses_an_invalid_entry_a_broken_list_and_too_many() {
        for entry in ["cp2=192.0.2.12:0", "cp2=192.0.2.12 check", "cp 2=192.0.2.12", "cp2=", "cp2=0.0.0.0"] {
            let e = Edit::add(entry, 6443).unwrap_err();
            assert!(matches!(e, EditError::InvalidEntry { .. }), "{entry:?}: {e}");
        }
        let e = plan(Some("cp1=192.0.2.11:6443 !!"), &add("cp2=192.0.2.12"), &opts()).unwrap_err();
        assert!(matches!(e, EditError::CurrentInvalid(_)), "{e}");
        let small = ParseOptions { max_members: 3, ..opts() };
        let e = plan(Some(THREE), &add("cp4=192.0.2.14"), &small).unwrap_err();
        assert_eq!(e, EditError::TooMany { count: 4, max: 3 });
        // Replacing one keeps the count.
        assert!(plan(Some(THREE), &add("cp4=192.0.2.13"), &small).is_ok());
    }

    #[test]
    fn remove_refuses_the_last_member_and_ignores_an_absent_one() {
        let two = "cp1=192.0.2.11:6443\ncp2=192.0.2.12:6443\n";
        let cp2 = Edit::remove("cp2").unwrap();
        assert_eq!(written(plan(Some(two), &cp2, &opts()).unwrap()), "cp1=192.0.2.11:6443\n");
        assert_eq!(plan(Some("cp1=192.0.2.11:6443\n"), &cp2, &opts()).unwrap(), Plan::Unchanged("not listed"));
        assert_eq!(plan(None, &cp2, &opts()).unwrap(), Plan::Unchanged("not listed"));
        let e = plan(Some("cp2=192.0.2.12:6443\n"), &cp2, &opts()).unwrap_err();
        assert_eq!(e, EditError::LastMember { name: "cp2".into() });
        let empty_ok = ParseOptions { allow_empty: true, ..opts() };
        assert_eq!(written(plan(Some("cp2=192.0.2.12:6443\n"), &cp2, &empty_ok).unwrap()), "");
    }
}
