//! Property tests of every decoder that takes input from outside the process: frames and the postcard
//! messages in them (from any peer holding a certificate), YAML documents (`ferryctl apply`), selectors,
//! resource types and names. Whatever the bytes: no panic, and no allocation beyond the declared caps — the
//! whole binary runs under a counting allocator whose peak is checked at the end.

use std::alloc::System;

use cap::Cap;
use ferry_common::protocol::{
    read_frame, AdminRequest, AdminResponse, AgentMsg, FrameError, Hello, HelloReply, JobMsg, JobReply, JobRequest,
    MAX_FRAME,
};
use ferry_common::resources::{validate_backup_id, validate_name, Resource, ResourceType, Selector};
use proptest::prelude::*;

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// What decoding one hostile input may cost at most: one frame's body plus its decoded copy, with room for the
/// test's own bookkeeping. A decoder trusting a claimed length (4 GiB frame, 2^32-element vector) blows it.
const PEAK_CAP: usize = 3 * MAX_FRAME + 64 * 1024 * 1024;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime builds")
}

/// Decodes `bytes` as one frame of every message type a peer may send; only errors, never panics.
fn decode_all(rt: &tokio::runtime::Runtime, bytes: &[u8]) {
    rt.block_on(async {
        let _ = read_frame::<_, Hello>(&mut &bytes[..]).await;
        let _ = read_frame::<_, HelloReply>(&mut &bytes[..]).await;
        let _ = read_frame::<_, AgentMsg>(&mut &bytes[..]).await;
        let _ = read_frame::<_, JobRequest>(&mut &bytes[..]).await;
        let _ = read_frame::<_, JobMsg>(&mut &bytes[..]).await;
        let _ = read_frame::<_, JobReply>(&mut &bytes[..]).await;
        let _ = read_frame::<_, AdminRequest>(&mut &bytes[..]).await;
        let _ = read_frame::<_, AdminResponse>(&mut &bytes[..]).await;
    });
}

/// A frame whose length prefix says `len` and whose body is `body` (possibly shorter or longer).
fn framed(len: u32, body: &[u8]) -> Vec<u8> {
    let mut v = len.to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_a_frame_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        decode_all(&runtime(), &bytes);
    }

    #[test]
    fn frames_with_lying_lengths_are_refused_or_truncated(
        len in any::<u32>(),
        body in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let rt = runtime();
        let bytes = framed(len, &body);
        decode_all(&rt, &bytes);
        let r = rt.block_on(read_frame::<_, AdminRequest>(&mut &bytes[..]));
        if len as usize > MAX_FRAME {
            let too_large = matches!(r, Err(FrameError::TooLarge { .. }));
            prop_assert!(too_large, "a frame over the cap is refused before reading it");
        } else if (len as usize) > body.len() {
            let truncated = matches!(r, Err(FrameError::Truncated));
            prop_assert!(truncated, "a frame shorter than its prefix is truncated");
        }
    }

    /// Postcard bodies whose varint lengths claim huge vectors and strings.
    #[test]
    fn postcard_bodies_claiming_huge_collections_cost_only_their_bytes(
        tag in 0u8..16,
        claims in proptest::collection::vec(any::<u32>(), 1..8),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut body = vec![tag];
        for c in claims {
            let mut c = c as u64 | 0x8000_0000;
            while c >= 0x80 {
                body.push((c as u8) | 0x80);
                c >>= 7;
            }
            body.push(c as u8);
        }
        body.extend_from_slice(&tail);
        decode_all(&runtime(), &framed(body.len() as u32, &body));
    }

    #[test]
    fn yaml_documents_never_panic_the_resource_parser(text in "(?s).{0,600}") {
        let _ = Resource::parse_documents(&text);
    }

    /// YAML shaped like resources, with hostile values in every field.
    #[test]
    fn resource_shaped_yaml_never_panics(
        ty in "[A-Za-z.]{0,40}",
        id in ".{0,80}",
        key in ".{0,300}",
        value in ".{0,300}",
        spec in "(?s).{0,200}",
    ) {
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let doc = format!(
            "metadata:\n  type: {}\n  id: {}\n  labels:\n    {}: {}\nspec: {}\n",
            q(&ty), q(&id), q(&key), q(&value), q(&spec)
        );
        let _ = Resource::parse_documents(&doc);
        for t in ["Clusters.ferry.dev", "EtcdBackupS3Configs.ferry.dev", "EtcdManualBackups.ferry.dev"] {
            let doc = format!("metadata:\n  type: {t}\n  id: {}\nspec:\n  {}: {}\n", q(&id), q(&key), q(&value));
            let _ = Resource::parse_documents(&doc);
        }
    }

    #[test]
    fn names_selectors_and_types_never_panic(s in ".{0,200}") {
        let _ = validate_name("cluster", &s);
        let _ = validate_backup_id(&s);
        let _ = s.parse::<Selector>();
        let _ = ResourceType::parse(&s);
    }
}

/// Runs last by name order is not guaranteed, so every property above also runs inside this one test's
/// process lifetime; the peak covers whatever ran before it, and it repeats the worst inputs itself.
#[test]
fn peak_allocation_stays_within_the_frame_cap() {
    let rt = runtime();
    // The worst claims, on purpose: a frame just under the cap announced with no body, and collections of
    // 2^32 - 1 elements.
    decode_all(&rt, &framed(MAX_FRAME as u32, &[]));
    decode_all(&rt, &framed(MAX_FRAME as u32 + 1, &[]));
    let mut body = vec![1u8];
    body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    decode_all(&rt, &framed(body.len() as u32, &body));
    let peak = ALLOCATOR.max_allocated();
    assert!(peak < PEAK_CAP, "decoding hostile input peaked at {peak} bytes (cap {PEAK_CAP})");
}
