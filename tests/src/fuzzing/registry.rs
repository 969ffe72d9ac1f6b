//! The lab registry file (`/run/podtrace/lab/PREFIX.json`) as podtrace reads it: any text
//! is a registry or an error, never a panic; a registry's lookups work on any name; and it
//! writes back to the same registry.

use podtrace::lab::registry::{self, Registry};

/// The `registry` target.
pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let reg: Registry = match registry::from_json(&text) {
        Ok(r) => r,
        Err(e) => {
            assert!(!e.to_string().contains('\n'), "{e}");
            return;
        }
    };
    let mut names: Vec<String> = reg.names().iter().map(|s| s.to_string()).collect();
    names.extend(
        reg.pods
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name)),
    );
    names.extend(["", "/", "default/", "pod-a1", "node-a", "master"].map(String::from));
    for n in &names {
        let pod = reg.pod(n);
        let node = reg.node(n);
        let ns = reg.netns_of(n);
        assert_eq!(ns.is_some(), pod.is_some() || node.is_some(), "{n:?}");
    }
    let _ = reg.netns_paths();
    let again = serde_json::to_string_pretty(&reg).expect("a registry serializes");
    let back = registry::from_json(&again).expect("a written registry reads back");
    assert_eq!(back, reg);
}
