//! ctnetlink answers as podtrace reads them (`podtrace::conntrack`): any bytes split into
//! netlink messages, and each message's attributes decoded as a conntrack entry and as
//! statistics. Never a panic; what is malformed is reported or left out.

use podtrace::conntrack::{msg, split_messages};

/// The `conntrack` target.
pub fn check(data: &[u8]) {
    let (msgs, _malformed) = split_messages(data);
    for m in msgs {
        // nfgenmsg: family, version, resource id; the attributes follow.
        let Some((head, attrs)) = m.payload.split_first_chunk::<4>() else {
            continue;
        };
        let e = msg::decode_entry(head[0], attrs);
        let _ = format!("{e:?}");
        let _ = msg::decode_cpu_stats(u16::from_ne_bytes([head[2], head[3]]), attrs);
        let _ = msg::decode_table_stats(attrs);
    }
}
