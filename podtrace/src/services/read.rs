//! Reading a node's rules: `iptables-save` run inside the node's network namespace.
//!
//! kube-proxy writes through either iptables backend (nf_tables or legacy), whichever the
//! node uses; rules written through one are invisible to the other's `iptables-save`. So the
//! default `iptables-save` is asked first and, when it shows no kube-proxy chain, the other
//! backend's (`iptables-nft-save`, `iptables-legacy-save`) when installed — what the
//! iptables-wrapper of kube-proxy's image does to pick its mode.
use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use super::{iptables, model};

/// A node's rules as read, and the Services in them.
#[derive(Debug, Clone)]
pub struct NodeRules {
    /// Which program printed them (`iptables-save`, `iptables-legacy-save`…).
    pub program: String,
    pub ruleset: iptables::Ruleset,
    pub services: model::NodeServices,
}

fn save_with(ns: Option<&Path>, program: &str) -> Result<Option<String>> {
    let out = crate::netns::run_in(ns, || {
        match Command::new(program)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
        {
            Ok(o) => Ok(Some(o)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("running {program}")),
        }
    })?;
    let Some(out) = out else {
        return Ok(None);
    };
    if !out.status.success() {
        bail!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Runs `iptables-save` in the namespace at `ns` (`None`: podtrace's own) and reads the
/// Services kube-proxy programmed there.
pub fn read_node(ns: Option<&Path>) -> Result<NodeRules> {
    let mut first = None;
    for program in ["iptables-save", "iptables-nft-save", "iptables-legacy-save"] {
        let Some(text) = save_with(ns, program)? else {
            continue;
        };
        let ruleset = iptables::parse(&text);
        let kube = ruleset.chains.iter().any(|c| c.name == "KUBE-SERVICES");
        let rules = NodeRules {
            program: program.to_owned(),
            services: model::from_rules(&ruleset),
            ruleset,
        };
        if kube {
            return Ok(rules);
        }
        first.get_or_insert(rules);
    }
    first.ok_or_else(|| {
        anyhow::anyhow!(
            "iptables-save is not installed (Debian: apt-get install iptables): podtrace reads \
             kube-proxy's Services with it"
        )
    })
}
