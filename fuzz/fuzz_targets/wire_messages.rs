//! Every protobuf message the peers exchange, decoded from arbitrary bytes,
//! then the conversions the handlers apply to them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;
use psi_proto::v1;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = v1::EvaluateRequest::decode(data) {
        let _ = psi_proto::unpack_blinded(&m.blinded_elements);
    }
    if let Ok(m) = v1::BucketQueryRequest::decode(data) {
        let _ = psi_proto::unpack_blinded(&m.blinded_elements);
    }
    if let Ok(m) = v1::EvaluateResponse::decode(data) {
        let _ = psi_proto::unpack_evaluated(&m.evaluated_elements);
        let _ = psi_core::Proof::from_bytes(&m.proof);
    }
    if let Ok(m) = v1::BucketQueryResponse::decode(data) {
        for b in &m.buckets {
            let _ = psi_proto::unpack_tags(&b.tags);
        }
    }
    if let Ok(m) = v1::SyncTagSetResponse::decode(data) {
        if let Some(v1::sync_tag_set_response::Item::Manifest(manifest)) = m.item {
            let _ = psi_proto::manifest_parts(&manifest);
        }
    }
    if let Ok(m) = v1::ServerInfo::decode(data) {
        let _ = psi_core::PublicKey::from_bytes(&m.public_key);
    }
});
