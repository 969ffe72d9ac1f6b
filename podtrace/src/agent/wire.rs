//! What travels between a front end and a node agent: the generated gRPC code
//! (proto/podtrace/agent/v1/agent.proto), the API version, and the rich values (a node's half
//! of a pod's path, plans, options, event batches) as MessagePack-encoded serde payloads.
use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::topology::{Hop, Topology};

/// The generated messages, client and server.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("podtrace.agent.v1");
}

/// The API's major version: the proto package's `v1`.
pub const API_VERSION: u32 = 1;
/// The layout of payloads (podtrace's serde types as MessagePack maps) at this API version.
pub const PAYLOAD_FORMAT: u32 = 1;
/// The largest payload either side accepts (a batch of events with packets is the largest).
pub const MAX_PAYLOAD: usize = 64 << 20;

/// Encodes a value as a payload.
pub fn encode<T: Serialize>(value: &T) -> Result<pb::Payload> {
    Ok(pb::Payload {
        format: PAYLOAD_FORMAT,
        data: rmp_serde::to_vec_named(value).context("encoding a payload")?,
    })
}

/// Decodes a payload (`what` names it in errors). Never panics on bad input.
pub fn decode<T: DeserializeOwned>(payload: Option<&pb::Payload>, what: &str) -> Result<T> {
    let Some(p) = payload else {
        bail!("the message carries no {what}");
    };
    if p.format != PAYLOAD_FORMAT {
        bail!(
            "{what} is in payload format {} (this podtrace reads {PAYLOAD_FORMAT}): versions differ",
            p.format
        );
    }
    if p.data.len() > MAX_PAYLOAD {
        bail!("{what} is {} bytes (at most {MAX_PAYLOAD})", p.data.len());
    }
    rmp_serde::from_slice(&p.data).with_context(|| format!("decoding {what}"))
}

/// A node's half of a pod's path, as its agent resolves it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Half {
    /// The pod's side and, for a source pod with a destination, the route decision and the
    /// hops up to where the traffic leaves the node (for a destination pod: the hops from the
    /// node's uplinks into the pod).
    pub topology: Topology,
    pub pod_ip: Option<Ipv4Addr>,
    /// The node's other uplinks (watched so a leak shows).
    pub other_uplinks: Vec<Hop>,
    /// Interface names of every namespace read, by path.
    pub interfaces: BTreeMap<PathBuf, BTreeMap<u32, String>>,
    /// What the node's namespace holds (links, addresses, routes, rules…): `verify eni` judges
    /// the node's policy routing from it.
    pub node_snapshot: Option<crate::netlink::Snapshot>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_refuse_garbage() {
        let v: Vec<(u32, String)> = vec![(1, "a".into()), (2, "b".into())];
        let p = encode(&v).unwrap();
        assert_eq!(decode::<Vec<(u32, String)>>(Some(&p), "x").unwrap(), v);
        let other = pb::Payload {
            format: 99,
            data: p.data.clone(),
        };
        assert!(decode::<Vec<(u32, String)>>(Some(&other), "x")
            .unwrap_err()
            .to_string()
            .contains("versions differ"));
        let garbage = pb::Payload {
            format: PAYLOAD_FORMAT,
            data: vec![0xff; 7],
        };
        assert!(decode::<Vec<(u32, String)>>(Some(&garbage), "x").is_err());
        assert!(decode::<u32>(None, "x").is_err());
    }

    #[test]
    fn event_batches_cross_the_wire_unchanged() {
        use crate::trace::{
            event::{DropEvent, Flow, HopEvent, Place},
            TraceEvent,
        };
        let flow = Flow {
            src: Ipv4Addr::new(10, 244, 0, 9),
            dst: Ipv4Addr::new(10, 244, 1, 5),
            proto: 1,
            outer: Some((
                Ipv4Addr::new(10, 30, 180, 56),
                Ipv4Addr::new(10, 30, 180, 55),
            )),
            ..Flow::default()
        };
        let batch = vec![
            TraceEvent::Hop(HopEvent {
                ts_ns: 7,
                hop: 3,
                hook: crate::trace::plan::Hook::Egress,
                len: 98,
                flow,
                packet: Some(bytes::Bytes::from_static(&[1, 2, 3])),
            }),
            TraceEvent::Drop(DropEvent {
                ts_ns: 8,
                at: Place { ns: 1, ifindex: 4 },
                hop: None,
                reason: "NETFILTER_DROP".into(),
                len: 98,
                flow,
            }),
            TraceEvent::Lost { total: 3 },
        ];
        let p = encode(&batch).unwrap();
        assert_eq!(
            decode::<Vec<TraceEvent>>(Some(&p), "events").unwrap(),
            batch
        );
        // Packets travel as MessagePack binary (bin 8, length 3), not as arrays of numbers.
        assert!(p.data.windows(5).any(|w| w == [0xc4, 3, 1, 2, 3]));
    }
}
