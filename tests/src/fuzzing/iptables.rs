//! `iptables-save` output as podtrace reads it for Services (`podtrace::services`): any text
//! parses to a ruleset (unknown lines become notes), from which the node's Services are
//! read. Never a panic.

use podtrace::services::{iptables, model};

/// The `iptables` target.
pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let rules = iptables::parse(&text);
    let services = model::from_rules(&rules);
    let _ = format!("{services:?}");
}
