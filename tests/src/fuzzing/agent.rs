//! The agent's protocol, as either side reads it from the network: every message of
//! `podtrace.agent.v1` from arbitrary bytes, and every payload inside them (plans, options,
//! a node's half of a path, event batches, start info, counters) — an error or a value, never
//! a panic; a plan that decodes is validated as the agent validates it; what decodes encodes
//! back to the same value.

use podtrace::{
    agent::wire::{self, pb, Half},
    trace::{event::Counters, Plan, StartInfo, TraceEvent, TraceOptions},
};
use prost::Message as _;

fn payload_round_trip<T>(p: &pb::Payload, what: &str)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = wire::decode::<T>(Some(p), what) {
        let again = wire::encode(&v).expect("a decoded value encodes");
        let back: T = wire::decode(Some(&again), what).expect("and decodes again");
        assert_eq!(back, v, "{what}");
    }
}

fn payloads(p: &pb::Payload) {
    if let Ok(plan) = wire::decode::<Plan>(Some(p), "plan") {
        // The agent's first check on a plan it is sent.
        let _ = plan.validate();
    }
    payload_round_trip::<Plan>(p, "plan");
    payload_round_trip::<TraceOptions>(p, "options");
    payload_round_trip::<Vec<TraceEvent>>(p, "events");
    payload_round_trip::<Counters>(p, "counters");
    if let Ok(h) = wire::decode::<Half>(Some(p), "half") {
        let again = wire::encode(&h).expect("a half encodes");
        let _: Half = wire::decode(Some(&again), "half").expect("and decodes again");
    }
    if let Ok(s) = wire::decode::<StartInfo>(Some(p), "start info") {
        let again = wire::encode(&s).expect("start info encodes");
        let _: StartInfo = wire::decode(Some(&again), "start info").expect("and decodes again");
    }
}

/// The `agent` target: the bytes as each message a peer may send, and as a payload.
pub fn check(data: &[u8]) {
    if let Ok(m) = pb::TraceRequest::decode(data) {
        for p in [&m.plan, &m.options].into_iter().flatten() {
            payloads(p);
        }
    }
    if let Ok(m) = pb::TraceMessage::decode(data) {
        match m.message {
            Some(pb::trace_message::Message::Events(p)) => payloads(&p),
            Some(pb::trace_message::Message::Ready(r)) => {
                if let Some(p) = &r.started {
                    payloads(p);
                }
            }
            Some(pb::trace_message::Message::End(e)) => {
                if let Some(p) = &e.counters {
                    payloads(p);
                }
            }
            None => {}
        }
    }
    if let Ok(m) = pb::ResolveReply::decode(data) {
        if let Some(p) = &m.half {
            payloads(p);
        }
    }
    let _ = pb::ResolveRequest::decode(data);
    let _ = pb::NodeInfo::decode(data);
    let _ = pb::StopRequest::decode(data);
    payloads(&pb::Payload {
        format: wire::PAYLOAD_FORMAT,
        data: data.to_vec(),
    });
}

/// Seeds: real messages of a session.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use podtrace::trace::plan::{FlowFilter, Hook, PlanNamespace, PlannedHop, Role, Step};
    let plan = Plan {
        namespaces: vec![PlanNamespace {
            path: "/run/netns/pt-node-b".into(),
            owner: "node-b".into(),
            node: "node-b".into(),
            interfaces: [(2, "eth0".to_owned()), (4, "flannel.1".to_owned())].into(),
        }],
        hops: vec![PlannedHop {
            id: 5,
            name: "node-b/eth0".into(),
            node: "node-b".into(),
            owner: "node-b".into(),
            role: Role::Uplink,
            ifname: "eth0".into(),
            ifindex: 2,
            netns: "/run/netns/pt-node-b".into(),
            ns: 0,
            on_path: true,
        }],
        forward: vec![Step {
            hop: 5,
            hook: Hook::Ingress,
        }],
        reverse: vec![Step {
            hop: 5,
            hook: Hook::Egress,
        }],
        filter: FlowFilter {
            pod: "10.244.0.9".parse().unwrap(),
            peer: Some("10.244.1.5".parse().unwrap()),
            proto: None,
            port: None,
            vxlan_ports: vec![8472],
            nat: Vec::new(),
        },
        nat: None,
    };
    let events: Vec<TraceEvent> = super::record::seeds()
        .iter()
        .filter_map(|(_, r)| {
            super::record::decoder().decode(r, &mut podtrace::trace::decode::Arena::default())
        })
        .collect();
    let trace = pb::TraceRequest {
        plan: Some(wire::encode(&plan).unwrap()),
        options: Some(wire::encode(&TraceOptions::default()).unwrap()),
        duration_ms: 5_000,
    };
    let batch = pb::TraceMessage {
        message: Some(pb::trace_message::Message::Events(
            wire::encode(&events).unwrap(),
        )),
    };
    let end = pb::TraceMessage {
        message: Some(pb::trace_message::Message::End(pb::End {
            reason: "stopped".into(),
            counters: Some(wire::encode(&Counters::default()).unwrap()),
        })),
    };
    vec![
        ("trace-request", trace.encode_to_vec()),
        ("events", batch.encode_to_vec()),
        ("end", end.encode_to_vec()),
        ("plan-payload", wire::encode(&plan).unwrap().data),
    ]
}
