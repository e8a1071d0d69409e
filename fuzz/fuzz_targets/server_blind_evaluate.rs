//! Blinded elements from a client: the server refuses bad ones precisely and
//! never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use psi_core::{BlindedElement, Mode, Server, ServerKey};
use std::sync::OnceLock;

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| Server::new(Mode::Voprf, ServerKey::from_bytes(&[7; 32]).expect("a valid key")))
}

fuzz_target!(|data: &[u8]| {
    let Ok(blinded) = psi_proto::unpack_blinded(data) else { return };
    let blinded: Vec<BlindedElement> = blinded.into_iter().take(64).collect();
    let _ = server().blind_evaluate(&blinded, &mut rand_core::OsRng);
});
