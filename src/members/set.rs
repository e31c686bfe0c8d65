//! The canonical member set and the difference between two sets.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::member::{Host, Member, ServerName};
use super::parse::{parse, MembersError, ParseOptions};

/// Members sorted by host, port and name, each address once and each server name once.
///
/// Serialized as a list of canonical entries (a state file, for instance); deserializing checks
/// every entry and the uniqueness rules again but no count cap, and accepts an empty list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct MemberSet {
    members: Vec<Member>,
}

impl MemberSet {
    /// The empty set.
    pub fn new() -> Self {
        MemberSet::default()
    }

    /// Builds a set from members in any order. Members equal in address and name collapse;
    /// one address under two names, or one name for two addresses, is refused (positions in
    /// the error count from 1 in iteration order).
    pub fn from_members<I: IntoIterator<Item = Member>>(members: I) -> Result<Self, MembersError> {
        MemberSet::from_positioned(members.into_iter().enumerate().map(|(i, m)| (i + 1, m)))
    }

    pub(super) fn from_positioned<I>(members: I) -> Result<Self, MembersError>
    where
        I: IntoIterator<Item = (usize, Member)>,
    {
        let mut by_address: BTreeMap<(Host, u16), (usize, ServerName)> = BTreeMap::new();
        let mut by_name: BTreeMap<ServerName, (usize, Member)> = BTreeMap::new();
        for (position, member) in members {
            let address = (member.host().clone(), member.port());
            if let Some((first_position, first_name)) = by_address.get(&address) {
                if first_name == member.name() {
                    continue;
                }
                return Err(MembersError::DuplicateAddress {
                    address: member.address().to_string(),
                    first_name: first_name.to_string(),
                    first_position: *first_position,
                    second_name: member.name().to_string(),
                    second_position: position,
                });
            }
            // The address is new here, so a known name means a second address for it.
            if let Some((first_position, first)) = by_name.get(member.name()) {
                return Err(MembersError::DuplicateName {
                    name: member.name().to_string(),
                    first: first.address().to_string(),
                    first_position: *first_position,
                    second: member.address().to_string(),
                    second_position: position,
                });
            }
            by_address.insert(address, (position, member.name().clone()));
            by_name.insert(member.name().clone(), (position, member));
        }
        let mut members: Vec<Member> = by_name.into_values().map(|(_, m)| m).collect();
        members.sort();
        Ok(MemberSet { members })
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Member> {
        self.members.iter()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The member with this HAProxy server name.
    pub fn get(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name().as_str() == name)
    }

    pub fn contains(&self, member: &Member) -> bool {
        self.members.binary_search(member).is_ok()
    }

    /// What turns `self` (what HAProxy has) into `desired`, keyed by server name: servers to add,
    /// servers to delete, and servers whose name stays but whose address changes (the Runtime
    /// API's `set server <b>/<s> addr`). A name keeps a stable address only when the operator
    /// chose it, so `changed_address` only ever holds explicitly named members. Each list is
    /// sorted like the sets.
    pub fn diff(&self, desired: &MemberSet) -> MemberDiff {
        let current_names = self.by_name();
        let desired_names = desired.by_name();
        let mut diff = MemberDiff::default();
        for old in &self.members {
            match desired_names.get(old.name()) {
                None => diff.removed.push(old.clone()),
                Some(new) if !new.same_address(old) => {
                    diff.changed_address.push(AddressChange { from: old.clone(), to: (*new).clone() })
                }
                Some(_) => {}
            }
        }
        for new in &desired.members {
            if !current_names.contains_key(new.name()) {
                diff.added.push(new.clone());
            }
        }
        diff
    }

    fn by_name(&self) -> BTreeMap<&ServerName, &Member> {
        self.members.iter().map(|m| (m.name(), m)).collect()
    }
}

/// See [`MemberSet::diff`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberDiff {
    pub added: Vec<Member>,
    pub removed: Vec<Member>,
    pub changed_address: Vec<AddressChange>,
}

/// What the Kubernetes client needs of the member list: each member's `host:port`, to talk to
/// the apiservers directly.
impl crate::kube::KnownServers for tokio::sync::watch::Receiver<MemberSet> {
    fn changed(&self) -> bool {
        self.has_changed().unwrap_or(false)
    }

    fn addresses(&mut self) -> Vec<String> {
        self.borrow_and_update().iter().map(|m| m.address().to_string()).collect()
    }

    fn boxed(&self) -> Box<dyn crate::kube::KnownServers> {
        Box::new(self.clone())
    }
}

impl MemberDiff {
    /// Whether the two sets were equal.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed_address.is_empty()
    }
}

/// One server name that moves to another address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressChange {
    pub from: Member,
    pub to: Member,
}

impl AddressChange {
    pub fn name(&self) -> &ServerName {
        self.to.name()
    }
}

impl<'a> IntoIterator for &'a MemberSet {
    type Item = &'a Member;
    type IntoIter = std::slice::Iter<'a, Member>;

    fn into_iter(self) -> Self::IntoIter {
        self.members.iter()
    }
}

/// Canonical entries separated by `, `: readable in a log line, and [`FromStr`] reads it back.
impl fmt::Display for MemberSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, member) in self.members.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            member.fmt(f)?;
        }
        Ok(())
    }
}

/// [`parse`] with the default [`ParseOptions`], for flags such as `--members 10.0.0.11,10.0.0.12`.
impl FromStr for MemberSet {
    type Err = MembersError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s, &ParseOptions::default())
    }
}

impl Serialize for MemberSet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(&self.members)
    }
}

impl<'de> Deserialize<'de> for MemberSet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let members = Vec::<Member>::deserialize(deserializer)?;
        MemberSet::from_members(members).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::yaml;

    fn set(s: &str) -> MemberSet {
        let opts = ParseOptions { allow_empty: true, ..ParseOptions::default() };
        parse(s, &opts).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn m(s: &str) -> Member {
        s.parse().unwrap()
    }

    fn texts(v: &[Member]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn diff_added_removed_and_changed() {
        let current = set("10.0.0.1, 10.0.0.2, cp1=10.0.0.3, cp2=a.example, cp4=10.0.0.9");
        let desired = set("10.0.0.2, 10.0.0.4, cp1=10.0.0.5, cp2=a.example:7443, cp3=10.0.0.6, cp4=10.0.0.9");
        let d = current.diff(&desired);
        assert_eq!(texts(&d.added), ["10.0.0.4:6443", "cp3=10.0.0.6:6443"]);
        assert_eq!(texts(&d.removed), ["10.0.0.1:6443"]);
        let changed: Vec<(String, String, String)> =
            d.changed_address.iter().map(|c| (c.name().to_string(), c.from.to_string(), c.to.to_string())).collect();
        assert_eq!(
            changed,
            [
                ("cp1".into(), "cp1=10.0.0.3:6443".into(), "cp1=10.0.0.5:6443".into()),
                ("cp2".into(), "cp2=a.example:6443".into(), "cp2=a.example:7443".into()),
            ]
        );
        assert!(!d.is_empty());
    }

    #[test]
    fn diff_of_equal_sets_is_empty_and_diff_reverses() {
        let a = set("10.0.0.1, cp1=10.0.0.3, b.example");
        assert!(a.diff(&a.clone()).is_empty());
        let b = set("10.0.0.2, cp1=10.0.0.4");
        let ab = a.diff(&b);
        let ba = b.diff(&a);
        assert_eq!(ab.added, ba.removed);
        assert_eq!(ab.removed, ba.added);
        assert_eq!(ab.changed_address.len(), 1);
        assert_eq!(ab.changed_address[0].from, ba.changed_address[0].to);
    }

    #[test]
    fn diff_from_and_to_empty() {
        let empty = MemberSet::new();
        let a = set("10.0.0.1, 10.0.0.2");
        assert_eq!(empty.diff(&a).added, a.iter().cloned().collect::<Vec<_>>());
        assert_eq!(a.diff(&empty).removed, a.iter().cloned().collect::<Vec<_>>());
        assert!(empty.diff(&empty).is_empty());
    }

    #[test]
    fn renaming_an_address_is_a_remove_and_an_add() {
        let d = set("cp1=10.0.0.1").diff(&set("cp9=10.0.0.1"));
        assert_eq!(texts(&d.removed), ["cp1=10.0.0.1:6443"]);
        assert_eq!(texts(&d.added), ["cp9=10.0.0.1:6443"]);
        assert!(d.changed_address.is_empty());
    }

    #[test]
    fn from_members_sorts_and_collapses() {
        let s = MemberSet::from_members([m("b.example"), m("10.0.0.2"), m("10.0.0.2:6443"), m("10.0.0.1")]).unwrap();
        assert_eq!(s.to_string(), "10.0.0.1:6443, 10.0.0.2:6443, b.example:6443");
        assert_eq!(s.len(), 3);
        assert!(s.contains(&m("10.0.0.2")));
        assert!(!s.contains(&m("x=10.0.0.2")));
        assert_eq!(s.get("m-10.0.0.1-6443"), Some(&m("10.0.0.1")));
        assert_eq!(s.get("nope"), None);
        assert_eq!(s.iter().count(), 3);
        assert_eq!((&s).into_iter().next(), Some(&m("10.0.0.1")));
        let e = MemberSet::from_members([m("a=10.0.0.1"), m("a=10.0.0.2")]).unwrap_err();
        assert!(matches!(e, MembersError::DuplicateName { first_position: 1, second_position: 2, .. }), "{e:?}");
    }

    #[test]
    fn display_reads_back() {
        let s = set("cp3=[fd00::13], 10.0.0.1:7443, Cp-2.Example");
        assert_eq!(s.to_string(), "10.0.0.1:7443, cp3=[fd00::13]:6443, cp-2.example:6443");
        assert_eq!(s.to_string().parse::<MemberSet>().unwrap(), s);
    }

    #[test]
    fn serde_as_a_list_of_canonical_strings() {
        let s = set("cp3=[fd00::13], 10.0.0.1:7443, Cp-2.Example");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"["10.0.0.1:7443","cp3=[fd00::13]:6443","cp-2.example:6443"]"#);
        assert_eq!(serde_json::from_str::<MemberSet>(&json).unwrap(), s);

        let text = yaml::to_string(&s).unwrap();
        assert_eq!(yaml::from_str::<MemberSet>(&text).unwrap(), s);
        // The YAML state file is itself a valid member list.
        assert_eq!(parse(&text, &ParseOptions::default()).unwrap(), s);

        assert_eq!(serde_json::from_str::<MemberSet>("[]").unwrap(), MemberSet::new());
    }

    #[test]
    fn deserializing_checks_entries_and_uniqueness() {
        let e = serde_json::from_str::<MemberSet>(r#"["10.0.0.1","10.0.0.1\nprogram x"]"#).unwrap_err();
        assert!(e.to_string().contains("'\\n'"), "{e}");
        let e = serde_json::from_str::<MemberSet>(r#"["a=10.0.0.1","a=10.0.0.2"]"#).unwrap_err();
        assert!(e.to_string().contains("server name \"a\""), "{e}");
        let e = serde_json::from_str::<MemberSet>("[6443]").unwrap_err();
        assert!(e.to_string().contains("invalid type: integer"), "{e}");
        let e = serde_json::from_str::<MemberSet>(r#""10.0.0.1""#).unwrap_err();
        assert!(e.to_string().contains("invalid type: string"), "{e}");
    }

    #[test]
    fn the_kubernetes_client_reads_each_members_address() {
        use crate::kube::KnownServers as _;
        let set: MemberSet = "10.0.0.12, [fd00::11]:7443, cp1=api.example:6443".parse().unwrap();
        let (tx, mut rx) = tokio::sync::watch::channel(set);
        assert_eq!(rx.addresses(), ["10.0.0.12:6443", "[fd00::11]:7443", "api.example:6443"]);
        assert!(!rx.changed());
        tx.send_replace("10.0.0.13".parse().unwrap());
        assert!(rx.changed());
        assert_eq!(rx.boxed().addresses(), ["10.0.0.13:6443"]);
    }
}
