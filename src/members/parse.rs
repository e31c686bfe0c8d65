//! The member list as operators write it in a ConfigMap value, a file or a flag.
//!
//! Two shapes are read:
//! - a YAML list, block (`- 10.0.0.11` lines) or flow (`[10.0.0.11, "cp-2:6443"]`);
//! - plain entries separated by commas or line ends, with `#` comment lines and blank lines; the
//!   spaces and tabs around an entry do not count, and one inside it makes it invalid.
//!
//! The input is YAML when its first line that is neither blank nor a comment starts with `- `
//! (or is `-`) or `---`; it is YAML too when that line starts with `[` and the whole input reads as
//! a YAML list, and plain otherwise, so that `[fd00::11]:6443, [fd00::12]:6443` stays a plain list.
//! Either way every entry then goes through the one grammar of [`Member::parse`], and one bad
//! entry refuses the whole list.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, SeqAccess, Visitor};

use super::member::{quoted, Member, MemberParseError, DEFAULT_PORT, MAX_ENTRY_LEN};
use super::set::MemberSet;
use crate::yaml::{self, YamlError};

/// Largest input read, in bytes. A member list is a few kilobytes; the cap bounds the work a
/// hostile ConfigMap value can cause before the entry count is known.
pub const MAX_INPUT_BYTES: usize = 256 * 1024;

/// How much of an overlong entry an error message quotes.
const QUOTE_LIMIT: usize = 64;

/// How a member list is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseOptions {
    /// Port of entries that name none.
    pub default_port: u16,
    /// Most entries accepted, counted before duplicates collapse.
    pub max_members: usize,
    /// Whether a list with no entry is accepted (as an empty set) instead of refused.
    pub allow_empty: bool,
}

impl Default for ParseOptions {
    fn default() -> Self {
        ParseOptions { default_port: DEFAULT_PORT, max_members: 32, allow_empty: false }
    }
}

/// Why a member list was refused. Positions count entries from 1, in input order.
///
/// Entries and names are quoted with every character outside printable ASCII escaped, so a message
/// cannot carry a raw newline, a control character or a lookalike that came from the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembersError {
    #[error("the member list is {len} bytes long, more than {max}")]
    InputTooLarge { len: usize, max: usize },
    #[error("the member list is not a valid YAML list of strings: {0}")]
    Yaml(#[from] YamlError),
    #[error("entry {position} of the member list is {found}, not a string{}", not_a_string_hint(found))]
    NotAString { position: usize, found: String },
    #[error("entry {position} of the member list, {}, is invalid: {reason}", quoted(entry))]
    InvalidEntry { position: usize, entry: String, reason: MemberParseError },
    #[error(
        "the member list has a YAML tag ({}) at line {line} column {column}: write members as plain or quoted strings",
        quoted(tag)
    )]
    Tagged { tag: String, line: usize, column: usize },
    #[error("the member list is empty")]
    Empty,
    #[error("the member list has {count} entries, more than {max}")]
    TooMany { count: usize, max: usize },
    #[error(
        "server name {} is given to {first} (entry {first_position}) and {second} (entry {second_position})",
        quoted(name)
    )]
    DuplicateName { name: String, first: String, first_position: usize, second: String, second_position: usize },
    #[error(
        "{address} is listed as {} (entry {first_position}) and as {} (entry {second_position})",
        quoted(first_name),
        quoted(second_name)
    )]
    DuplicateAddress {
        address: String,
        first_name: String,
        first_position: usize,
        second_name: String,
        second_position: usize,
    },
}

fn not_a_string_hint(found: &str) -> &'static str {
    if found == "a mapping" || found == "a list" {
        " (in YAML, quote an entry that starts with '[', like \"[fd00::11]:6443\")"
    } else {
        ""
    }
}

/// Reads a member list (see the module documentation) into a canonical set.
///
/// Refused, naming the entry and its position: any entry that is not a member, more than
/// `max_members` entries, no entry (unless `allow_empty`), one address under two server names, one
/// server name for two addresses. Entries with the same address and name collapse into one.
pub fn parse(input: &str, opts: &ParseOptions) -> Result<MemberSet, MembersError> {
    if input.len() > MAX_INPUT_BYTES {
        return Err(MembersError::InputTooLarge { len: input.len(), max: MAX_INPUT_BYTES });
    }
    let Split { items, flow_error } = split(input)?;
    if items.len() > opts.max_members {
        return Err(MembersError::TooMany { count: items.len(), max: opts.max_members });
    }
    if items.is_empty() && !opts.allow_empty {
        return Err(MembersError::Empty);
    }
    let mut members = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let position = i + 1;
        let text = match item {
            Item::Text(text) => text,
            Item::Other(found) => return Err(MembersError::NotAString { position, found }),
        };
        match Member::parse(&text, opts.default_port) {
            Ok(member) => members.push((position, member)),
            // NOTE: input starting with '[' that YAML could not read was taken as a plain list;
            // when that fails too and the input ends like a flow list, the YAML error is the one
            // that explains it (an unquoted "[...]" inside, a missing ','), unless the entry has
            // words in it: then the entry is what to name.
            Err(reason) if flow_error.is_some() && input.trim_end().ends_with(']') && !is_white_space(&reason) => {
                return Err(MembersError::Yaml(flow_error.expect("checked")))
            }
            Err(reason) => return Err(MembersError::InvalidEntry { position, entry: quote_excerpt(&text), reason }),
        }
    }
    MemberSet::from_positioned(members)
}

fn is_white_space(reason: &MemberParseError) -> bool {
    matches!(reason, MemberParseError::ForbiddenChar { ch, .. } if ch.is_whitespace())
}

/// An overlong entry is only ever refused for its length; quoting all of it would let one
/// ConfigMap value flood the log.
fn quote_excerpt(entry: &str) -> String {
    if entry.len() <= MAX_ENTRY_LEN {
        return entry.to_owned();
    }
    entry.chars().take(QUOTE_LIMIT).collect()
}

/// One list item before it is parsed as a member.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Text(String),
    /// A YAML item that is not a string, described for the error message.
    Other(String),
}

struct Split {
    items: Vec<Item>,
    /// Why the input, which starts like a YAML flow list, was read as a plain list instead.
    flow_error: Option<YamlError>,
}

fn split(input: &str) -> Result<Split, MembersError> {
    let (items, flow_error) = match first_significant_line(input) {
        Some(line) if is_block_yaml(line) => {
            refuse_tags(input)?;
            (yaml::from_str::<YamlList>(input)?.0, None)
        }
        Some(line) if line.starts_with('[') => match yaml::from_str::<YamlList>(input) {
            Ok(list) => {
                refuse_tags(input)?;
                (list.0, None)
            }
            Err(e) => (split_plain(input), Some(e)),
        },
        _ => (split_plain(input), None),
    };
    Ok(Split { items, flow_error })
}

/// Refuses any YAML tag (`!!binary`, `!!str`, `!custom`, on an item or on the list): the YAML
/// reader would apply or drop it silently, and a member list has no use for one.
///
/// NOTE: a lexical scan, deliberately broader than YAML's grammar: a `!` that starts a token
/// outside quotes and comments. Member entries can never contain `!`, so nothing valid is lost.
fn refuse_tags(input: &str) -> Result<(), MembersError> {
    for (n, line) in input.lines().enumerate() {
        let mut quote: Option<char> = None;
        let mut previous = ' ';
        for (i, ch) in line.char_indices() {
            match quote {
                Some(q) if ch == q => quote = None,
                Some(_) => {}
                None if ch == '"' || ch == '\'' => quote = Some(ch),
                None if ch == '#' && previous.is_whitespace() => break,
                None if ch == '!' && (previous.is_whitespace() || matches!(previous, '[' | ',' | '{' | '-' | ':')) => {
                    let tag: String = line[i..].chars().take_while(|c| !c.is_whitespace() && *c != ',').collect();
                    return Err(MembersError::Tagged { tag, line: n + 1, column: i + 1 });
                }
                None => {}
            }
            previous = ch;
        }
    }
    Ok(())
}

fn first_significant_line(input: &str) -> Option<&str> {
    input
        .lines()
        .map(|line| line.trim_start_matches([' ', '\t']))
        .find(|line| !line.trim_end().is_empty() && !line.starts_with('#'))
}

fn is_block_yaml(line: &str) -> bool {
    let line = line.trim_end();
    line == "-" || line.starts_with("- ") || line.starts_with("-\t") || line.starts_with("---")
}

/// Entries end at a comma or a line end; spaces and tabs around an entry are dropped, and what is
/// left is the entry, words inside it and all.
///
/// NOTE: white space does not separate entries. When it did, a pasted HAProxy line
/// (`server evil 10.201.66.6:6443 check`) became four members, one of them an address nobody
/// listed; now it is one entry that the grammar refuses, and the whole list with it.
fn split_plain(input: &str) -> Vec<Item> {
    input
        .lines()
        .filter(|line| !line.trim_start_matches([' ', '\t']).starts_with('#'))
        .flat_map(|line| line.split(','))
        .map(|entry| entry.trim_matches([' ', '\t', '\r']))
        .filter(|entry| !entry.is_empty())
        .map(|entry| Item::Text(entry.to_owned()))
        .collect()
}

/// A YAML list whose items are kept as [`Item`]s, so that a non-string item is reported with its
/// position instead of as a bare type error. An empty document is an empty list.
struct YamlList(Vec<Item>);

impl<'de> Deserialize<'de> for YamlList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor;

        impl<'de> Visitor<'de> for ListVisitor {
            type Value = YamlList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of member addresses")
            }

            fn visit_unit<E: de::Error>(self) -> Result<YamlList, E> {
                Ok(YamlList(Vec::new()))
            }

            fn visit_none<E: de::Error>(self) -> Result<YamlList, E> {
                Ok(YamlList(Vec::new()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<YamlList, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Item>()? {
                    items.push(item);
                }
                Ok(YamlList(items))
            }
        }

        deserializer.deserialize_any(ListVisitor)
    }
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ItemVisitor;

        impl<'de> Visitor<'de> for ItemVisitor {
            type Value = Item;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member address")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Item, E> {
                Ok(Item::Text(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Item, E> {
                Ok(Item::Text(v))
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Item, E> {
                Ok(Item::Other(format!("the boolean {v}")))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Item, E> {
                Ok(Item::Other(format!("the number {v}")))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Item, E> {
                Ok(Item::Other(format!("the number {v}")))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Item, E> {
                Ok(Item::Other(format!("the number {v}")))
            }

            fn visit_unit<E: de::Error>(self) -> Result<Item, E> {
                Ok(Item::Other("empty".into()))
            }

            fn visit_none<E: de::Error>(self) -> Result<Item, E> {
                Ok(Item::Other("empty".into()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Item::Other("a list".into()))
            }

            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Item::Other("a mapping".into()))
            }
        }

        deserializer.deserialize_any(ItemVisitor)
    }
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;

    fn ok(input: &str) -> Vec<String> {
        match parse(input, &ParseOptions::default()) {
            Ok(set) => set.iter().map(ToString::to_string).collect(),
            Err(e) => panic!("{input:?} should parse: {e}"),
        }
    }

    fn refused(input: &str) -> MembersError {
        refused_with(input, &ParseOptions::default())
    }

    fn refused_with(input: &str, opts: &ParseOptions) -> MembersError {
        match parse(input, opts) {
            Ok(set) => panic!("{input:?} should be refused, got {set:?}"),
            Err(e) => e,
        }
    }

    const EXPECTED: [&str; 4] =
        ["10.0.0.11:6443", "cp1=10.0.0.12:6443", "cp3=[fd00::13]:6443", "cp-2.example.internal:6443"];

    #[test]
    fn all_shapes_give_the_same_set() {
        let inputs = [
            "10.0.0.11, cp1=10.0.0.12:6443, cp3=[fd00::13]:6443, CP-2.example.internal",
            // Spaces and tabs around an entry do not count.
            "  10.0.0.11 ,\tcp1=10.0.0.12:6443 ,cp3=[fd00::13]:6443\t,  cp-2.example.internal:6443  \n",
            "\n\n 10.0.0.11\n\n\tcp1=10.0.0.12:6443\t\r\n  cp3=[fd00::13]:6443 \n\n cp-2.example.internal:6443,\n\n",
            "# control plane\n10.0.0.11\n  # second\ncp1=10.0.0.12:6443,\ncp3=[fd00::13]\r\n\tcp-2.example.internal\n",
            "- 10.0.0.11\n- cp1=10.0.0.12:6443\n- cp3=[fd00::13]:6443\n- cp-2.example.internal\n",
            "# members\n---\n- 10.0.0.11   # first\n- 'cp1=10.0.0.12:6443'\n- \"cp3=[fd00::13]:6443\"\n-   cp-2.example.internal:6443\n",
            "[10.0.0.11, \"cp1=10.0.0.12:6443\", 'cp3=[fd00::13]:6443', cp-2.example.internal]",
            "[\n  10.0.0.11,\n  cp1=10.0.0.12,\n  \"cp3=[fd00::13]\",\n  cp-2.example.internal,\n]\n",
            // Duplicates collapse, in any spelling of the same member.
            "10.0.0.11, 10.0.0.11:6443, m-10.0.0.11-6443=10.0.0.11\ncp1=10.0.0.12, cp3=[fd00::13], cp3=FD00::13\ncp-2.example.internal, cp-2.EXAMPLE.internal:6443",
        ];
        for input in inputs {
            assert_eq!(ok(input), EXPECTED, "{input:?}");
        }
    }

    #[test]
    fn plain_list_starting_with_a_bracketed_ipv6_address() {
        assert_eq!(ok("[fd00::11]:6443, [fd00::12]:6443"), ["[fd00::11]:6443", "[fd00::12]:6443"]);
        assert_eq!(ok("[fd00::11]:6443"), ["[fd00::11]:6443"]);
        assert_eq!(ok("[fd00::11]\n[fd00::12]"), ["[fd00::11]:6443", "[fd00::12]:6443"]);
        assert_eq!(ok("  [fd00::11]:7443 ,\t[fd00::12]  "), ["[fd00::11]:7443", "[fd00::12]:6443"]);
        // Also YAML: a flow list with one item.
        assert_eq!(ok("[fd00::11]"), ["[fd00::11]:6443"]);
    }

    #[test]
    fn options_are_applied() {
        let opts = ParseOptions { default_port: 7443, ..ParseOptions::default() };
        let set = parse("10.0.0.1, 10.0.0.2:6443", &opts).unwrap();
        let text: Vec<String> = set.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["10.0.0.1:7443", "10.0.0.2:6443"]);
    }

    #[test]
    fn empty_lists() {
        for input in ["", "  \n\t\n", "# nothing yet\n", ",,", "[]", "---\n", "- # none\n"] {
            if input == "- # none\n" {
                // A YAML item with no value is an entry, and not a string.
                assert!(matches!(refused(input), MembersError::NotAString { position: 1, .. }));
                continue;
            }
            assert_eq!(refused(input), MembersError::Empty, "{input:?}");
            let opts = ParseOptions { allow_empty: true, ..ParseOptions::default() };
            assert!(parse(input, &opts).unwrap().is_empty(), "{input:?}");
        }
    }

    #[test]
    fn cap_counts_entries_before_duplicates_collapse() {
        let opts = ParseOptions { max_members: 3, ..ParseOptions::default() };
        assert_eq!(parse("a.b, c.d, e.f", &opts).unwrap().len(), 3);
        assert_eq!(refused_with("a.b, a.b\na.b, a.b", &opts), MembersError::TooMany { count: 4, max: 3 });
        assert_eq!(refused_with("[a.b, c.d, e.f, g.h]", &opts), MembersError::TooMany { count: 4, max: 3 });
        let many: Vec<String> = (1..=33).map(|i| format!("10.0.0.{i}")).collect();
        assert_eq!(refused(&many.join(",")), MembersError::TooMany { count: 33, max: 32 });
        assert_eq!(ok(&many[..32].join("\n")).len(), 32);
    }

    #[test]
    fn invalid_entry_is_named_with_its_position() {
        let e = refused("10.0.0.1, 10.0.0.2\n10.0.0.3:0");
        assert!(
            matches!(&e, MembersError::InvalidEntry { position: 3, entry, reason: MemberParseError::InvalidPort { .. } } if entry == "10.0.0.3:0"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "entry 3 of the member list, \"10.0.0.3:0\", is invalid: invalid port \"0\": port 0 is not allowed"
        );
        let e = refused("- 10.0.0.1\n- 1.2.3.999\n");
        assert!(matches!(&e, MembersError::InvalidEntry { position: 2, entry, .. } if entry == "1.2.3.999"), "{e:?}");
    }

    #[test]
    fn first_bad_entry_wins_and_nothing_is_half_applied() {
        let e = refused("10.0.0.1, bad_host, 10.0.0.2:0");
        assert!(matches!(e, MembersError::InvalidEntry { position: 2, .. }), "{e:?}");
    }

    #[test]
    fn yaml_items_that_are_not_strings() {
        let cases = [
            ("- 10.0.0.1\n- 6443\n", 2, "the number 6443"),
            ("- true\n", 1, "the boolean true"),
            ("- 10.5\n", 1, "the number 10.5"),
            ("- ~\n", 1, "empty"),
            ("- [a, b]\n", 1, "a list"),
            ("- a: b\n", 1, "a mapping"),
            ("[[fd00::11]:6443, 10.0.0.1]", 1, "a mapping"),
        ];
        for (input, pos, what) in cases {
            assert_eq!(refused(input), MembersError::NotAString { position: pos, found: what.into() }, "{input:?}");
        }
        let msg = refused("[[fd00::11]:6443]").to_string();
        assert!(msg.contains("quote an entry"), "{msg}");
    }

    #[test]
    fn yaml_errors_are_reported_as_yaml() {
        for input in [
            "- 10.0.0.1\n- [fd00::11]:6443\n",
            "- 10.0.0.1\n  - 10.0.0.2\n- : x\n",
            "---\nmembers: [10.0.0.1]\n",
            "--- 10.0.0.1\n",
            "- a\n---\n- b\n",
        ] {
            let e = refused(input);
            assert!(matches!(e, MembersError::Yaml(_)), "{input:?} gave {e:?}");
        }
        let e = refused("- a\n- b\n  c: d\n");
        let MembersError::Yaml(y) = &e else { panic!("{e:?}") };
        assert_eq!(y.line(), Some(3), "{e}");
        assert!(e.to_string().contains("line 3"), "{e}");
    }

    #[test]
    fn unquoted_brackets_in_a_flow_list_give_the_yaml_error() {
        for input in ["[10.0.0.11, cp3=[fd00::13]:6443]", "[10.0.0.11, 10.0.0.12"] {
            let e = refused(input);
            if input.ends_with(']') {
                assert!(matches!(&e, MembersError::Yaml(y) if y.column().is_some()), "{input:?} gave {e:?}");
            } else {
                // Not shaped like a flow list: the plain reading names the entry.
                assert!(
                    matches!(
                        e,
                        MembersError::InvalidEntry { position: 1, reason: MemberParseError::UnclosedBracket, .. }
                    ),
                    "{input:?} gave {e:?}"
                );
            }
        }
    }

    #[test]
    fn words_on_one_line_are_one_invalid_entry() {
        // A HAProxy line or section pasted into the list: before, every word became a member
        // (`10.201.66.6:6443` among them); now the line is one entry, refused, and the list with it.
        for (input, position, entry) in [
            ("cp1=10.0.0.11:6443\nserver evil 10.201.66.6:6443 check", 2, "server evil 10.201.66.6:6443 check"),
            ("cp1=10.0.0.11:6443\nbackend evil\n  mode http", 2, "backend evil"),
            ("cp1=10.0.0.11:6443 check inter 1s", 1, "cp1=10.0.0.11:6443 check inter 1s"),
            ("10.0.0.11, 10.0.0.12 10.0.0.13", 2, "10.0.0.12 10.0.0.13"),
            ("10.0.0.11\t10.0.0.12", 1, "10.0.0.11\t10.0.0.12"),
            ("10.0.0.11,\n  10.0.0.12 # the second", 2, "10.0.0.12 # the second"),
            ("[fd00::11] [fd00::12]:6443", 1, "[fd00::11] [fd00::12]:6443"),
            // Shaped like a YAML flow list that YAML cannot read: the entry is still named.
            ("[fd00::11]:6443\nserver evil [fd00::66]", 2, "server evil [fd00::66]"),
            ("[fd00::11] [fd00::12]", 1, "[fd00::11] [fd00::12]"),
            ("10.0.0.11\r10.0.0.12", 1, "10.0.0.11\r10.0.0.12"),
        ] {
            let e = refused(input);
            assert!(
                matches!(
                    &e,
                    MembersError::InvalidEntry { position: p, entry: en, reason: MemberParseError::ForbiddenChar { ch, .. } }
                        if *p == position && en == entry && ch.is_whitespace()
                ),
                "{input:?} gave {e:?}"
            );
            // The message names the entry, escaped: no raw tab or carriage return gets through.
            let msg = e.to_string();
            assert!(msg.contains(&quoted(entry)), "{msg}");
            assert!(msg.contains("one entry cannot contain white space"), "{msg}");
            assert!(msg.chars().all(|c| c == ' ' || c.is_ascii_graphic()), "message is not plain ASCII: {msg:?}");
        }
        assert_eq!(
            refused("cp1=10.0.0.11:6443\nserver evil 10.201.66.6:6443 check").to_string(),
            "entry 2 of the member list, \"server evil 10.201.66.6:6443 check\", is invalid: character ' ' (U+0020) \
             at byte 6 is not allowed (one entry cannot contain white space: separate entries with ',' or a line end)"
        );
    }

    #[test]
    fn the_plain_forms_the_docs_promise_stay_accepted() {
        // One entry per line, blank lines, comment lines (indented too), CRLF line ends.
        assert_eq!(
            ok("# cp\n\ncp1=10.0.0.11:6443\n\n  # next\n\tcp2=10.0.0.12\r\n"),
            ["cp1=10.0.0.11:6443", "cp2=10.0.0.12:6443"]
        );
        // Commas, with or without spaces, and a trailing one.
        assert_eq!(ok("10.0.0.11,10.0.0.12 , 10.0.0.13,"), ["10.0.0.11:6443", "10.0.0.12:6443", "10.0.0.13:6443"]);
        // Both at once.
        assert_eq!(ok("10.0.0.11, 10.0.0.12\n10.0.0.13"), ["10.0.0.11:6443", "10.0.0.12:6443", "10.0.0.13:6443"]);
        // IPv6 in brackets, with and without a port, and bare.
        assert_eq!(
            ok("cp3=[fd00::13]:7443\n[fd00::14]\nfd00::15"),
            ["cp3=[fd00::13]:7443", "[fd00::14]:6443", "[fd00::15]:6443"]
        );
        // DNS names, named or not.
        assert_eq!(
            ok(" cp1=cp-1.example.internal , cp-2.example.internal:6443 "),
            ["cp1=cp-1.example.internal:6443", "cp-2.example.internal:6443"]
        );
        // What `cpha members add` writes.
        assert_eq!(ok("cp1=10.0.0.11:6443\ncp2=10.0.0.12:6443\n"), ["cp1=10.0.0.11:6443", "cp2=10.0.0.12:6443"]);
    }

    #[test]
    fn yaml_tags_are_refused_not_dropped() {
        for (input, tag, line, column) in [
            ("- !!binary MTAuMjAxLjEuMjo2NDQz\n", "!!binary", 1, 3),
            ("- 10.0.0.1\n- !!timestamp 2001-12-14\n", "!!timestamp", 2, 3),
            ("- !!str 10.0.0.1\n", "!!str", 1, 3),
            ("--- !!seq\n- 10.0.0.1\n", "!!seq", 1, 5),
            ("- &a !custom 10.0.0.1\n", "!custom", 1, 6),
            ("[10.0.0.1, !!binary aGVsbG8=]", "!!binary", 1, 12),
        ] {
            let e = refused(input);
            assert_eq!(e, MembersError::Tagged { tag: tag.into(), line, column }, "{input:?}");
            assert!(e.to_string().contains("YAML tag"), "{e}");
        }
        // A `!` inside quotes or a comment is no tag (and quoted, it still meets the grammar).
        assert_eq!(ok("- 10.0.0.1 # not !!binary\n"), ["10.0.0.1:6443"]);
        let e = refused("- \"!!binary x\"\n");
        assert!(matches!(e, MembersError::InvalidEntry { position: 1, .. }), "{e:?}");
    }

    #[test]
    fn a_yaml_string_is_one_entry() {
        // What YAML unquotes still goes through the entry grammar.
        let e = refused("- \"10.0.0.1\\nprogram x\"\n");
        assert!(
            matches!(
                e,
                MembersError::InvalidEntry {
                    position: 1,
                    reason: MemberParseError::ForbiddenChar { ch: '\n', .. },
                    ..
                }
            ),
            "{e:?}"
        );
        let e = refused("- \"10.0.0.1, 10.0.0.2\"\n");
        assert!(
            matches!(e, MembersError::InvalidEntry { reason: MemberParseError::ForbiddenChar { ch: ',', .. }, .. }),
            "{e:?}"
        );
        let e = refused("[\"10.0.0.1 backup\"]");
        assert!(
            matches!(e, MembersError::InvalidEntry { reason: MemberParseError::ForbiddenChar { ch: ' ', .. }, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn injection_attempts_are_refused_whole() {
        let cases = [
            "10.0.0.11:6443\nprogram pwn\n  command /bin/sh -c id",
            "10.0.0.11:6443;shutdown sessions server kube/m-10.0.0.11-6443",
            "10.0.0.11;set server kube/x addr 1.2.3.4",
            "10.0.0.11 # trailing comment",
            "10.0.0.11#6443",
            "10.0.0.11\0",
            "- \"10.0.0.11:6443\\n  external-check command /bin/sh\"\n",
            "- '10.0.0.11;disable server kube/cp1'\n",
            "[\"10.0.0.11\\u0000\"]",
            "cp-1.ex\u{430}mple.internal",
            "10.0.0.11\u{2028}program x",
            "10.0.0.11\u{85}",
            "10.0.0.11\u{b}",
            "fe80::1%eth0",
            "cp1=10.0.0.11\u{ff1a}6443",
        ];
        for input in cases {
            let e = refused(input);
            assert!(
                matches!(e, MembersError::InvalidEntry { reason: MemberParseError::ForbiddenChar { .. }, .. }),
                "{input:?} gave {e:?}"
            );
            let msg = e.to_string();
            assert!(msg.chars().all(|c| c == ' ' || c.is_ascii_graphic()), "message is not plain ASCII: {msg:?}");
        }
    }

    #[test]
    fn very_long_inputs() {
        let e = refused(&"1".repeat(MAX_INPUT_BYTES + 1));
        assert_eq!(e, MembersError::InputTooLarge { len: MAX_INPUT_BYTES + 1, max: MAX_INPUT_BYTES });
        // One long entry: refused on length, quoted only in part.
        let long = format!("{}.example", "a".repeat(10_000));
        let e = refused(&long);
        match &e {
            MembersError::InvalidEntry {
                position: 1,
                entry,
                reason: MemberParseError::TooLong { len: 10_008, .. },
            } => assert_eq!(entry.len(), QUOTE_LIMIT),
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().len() < 200, "{e}");
        // Many entries within the byte cap: refused on count without parsing them.
        let many = "10.0.0.1,".repeat(20_000);
        assert!(matches!(refused(&many), MembersError::TooMany { count: 20_000, .. }));
        // Deep YAML nesting is refused by the YAML reader, not by a stack overflow.
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        refused(&deep);
        // So is an alias bomb (10^9 strings once expanded).
        let mut bomb = String::from("- &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let p = i - 1;
            bomb.push_str(&format!("- &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"));
        }
        refused(&bomb);
        refused("- &a [*a]\n");
    }

    #[test]
    fn same_address_under_two_names_is_refused() {
        let e = refused("cp1=10.0.0.11, cp2=10.0.0.11:6443");
        assert_eq!(
            e,
            MembersError::DuplicateAddress {
                address: "10.0.0.11:6443".into(),
                first_name: "cp1".into(),
                first_position: 1,
                second_name: "cp2".into(),
                second_position: 2,
            }
        );
        // A derived name is a name too.
        let e = refused("10.0.0.11\ncp1=10.0.0.11");
        assert!(matches!(e, MembersError::DuplicateAddress { .. }), "{e:?}");
        // Different ports are different addresses.
        assert_eq!(ok("10.0.0.11:6443, 10.0.0.11:7443").len(), 2);
    }

    #[test]
    fn same_name_for_two_addresses_is_refused() {
        let e = refused("cp1=10.0.0.11\ncp1=10.0.0.12");
        assert_eq!(
            e,
            MembersError::DuplicateName {
                name: "cp1".into(),
                first: "10.0.0.11:6443".into(),
                first_position: 1,
                second: "10.0.0.12:6443".into(),
                second_position: 2,
            }
        );
        let e = refused("m-10.0.0.12-6443=10.0.0.11, 10.0.0.12");
        assert!(matches!(e, MembersError::DuplicateName { .. }), "{e:?}");
    }

    #[test]
    fn shape_detection() {
        assert_eq!(first_significant_line("\n  # c\n\t- a\n"), Some("- a"));
        assert!(is_block_yaml("- a"));
        assert!(is_block_yaml("-"));
        assert!(is_block_yaml("---"));
        assert!(!is_block_yaml("-a"));
        // A plain entry cannot start with '-', so this is refused as an entry, not as YAML.
        assert!(matches!(refused("-10.0.0.1"), MembersError::InvalidEntry { .. }));
    }
}
