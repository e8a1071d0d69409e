//! A server's evaluated elements and proof: the client rejects anything that
//! is not a valid evaluation under the pinned key, and never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use psi_core::{Blinding, Client, Mode, Proof, ServerKey};
use std::sync::OnceLock;

fn client() -> &'static Client {
    static C: OnceLock<Client> = OnceLock::new();
    C.get_or_init(|| {
        let key = ServerKey::from_bytes(&[9; 32]).expect("a valid key");
        Client::new(Mode::Voprf, *key.public_key())
    })
}

fuzz_target!(|data: &[u8]| {
    let client = client();
    let (proof, rest) = data.split_at(data.len().min(64));
    let Ok(evaluated) = psi_proto::unpack_evaluated(rest) else { return };
    if evaluated.is_empty() || evaluated.len() > 16 {
        return;
    }
    let inputs: Vec<Vec<u8>> = (0..evaluated.len()).map(|i| vec![i as u8]).collect();
    let (state, _) = client.blind(&inputs, Blinding::Additive, &mut rand_core::OsRng).expect("blinding");
    match Proof::from_bytes(proof) {
        Ok(proof) => assert!(client.finalize(state, &inputs, &evaluated, &proof).is_err()),
        Err(_) => {
            let _ = client.finalize_unverified(state, &inputs, &evaluated);
        }
    }
});
