//! The exchanges that answer records: evaluation (sync mode's tags), bucket
//! queries and PIR queries, each verified before anything is concluded.

use std::collections::HashMap;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use psi_core::{BlindState, BlindedElement, Output, Proof, Record};
use psi_proto::v1::{
    BucketQueryRequest, EvaluateRequest, PartialEvaluation, PirQueryRequest, PirSetupRequest,
};
use psi_proto::{pack, partial_from_proto, unpack_evaluated, unpack_tags};
use rand_core::OsRng;

use super::{on_cpu, Answers, Session};
use crate::error::{Error, Result};

impl Session {
    /// PRF outputs for encoded records, in order: blinded, sent in chunks of
    /// the server's `max_batch` with several in flight, proofs verified.
    ///
    /// # Errors
    /// RPC failures, a stale epoch, or a proof that does not verify.
    pub async fn evaluate(&self, inputs: Vec<Vec<u8>>) -> Result<Vec<Output>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let max = (self.info.max_batch as usize).clamp(1, psi_core::proof::MAX_PROOF_BATCH);
        let mut chunks = Vec::new();
        let mut rest = inputs;
        while !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(max));
            chunks.push(rest);
            rest = tail;
        }
        let results: Vec<Vec<Output>> = futures::stream::iter(chunks)
            .map(|chunk| self.evaluate_chunk(chunk))
            .buffered(self.options.concurrency.max(1))
            .try_collect()
            .await?;
        Ok(results.into_iter().flatten().collect())
    }

    async fn evaluate_chunk(&self, inputs: Vec<Vec<u8>>) -> Result<Vec<Output>> {
        let (inputs, state, blinded) = self.blind(inputs).await?;
        let message = EvaluateRequest {
            key_epoch: self.info.key_epoch,
            blinded_elements: pack(blinded.iter().map(|b| &b.0)),
            combines_partials: true,
        };
        let response = self
            .ask("evaluating", || {
                let mut grpc = self.grpc.clone();
                let request = self.request(message.clone());
                async move { grpc.evaluate(request).await }
            })
            .await?;
        self.finalize(
            state,
            inputs,
            response.key_epoch,
            &response.evaluated_elements,
            &response.proof,
            &response.partials,
        )
        .await
    }

    /// Blinds `inputs` on the rayon pool; returns them with the state and the blinded elements.
    async fn blind(
        &self,
        inputs: Vec<Vec<u8>>,
    ) -> Result<(Vec<Vec<u8>>, BlindState, Vec<BlindedElement>)> {
        let core = Arc::clone(&self.core);
        let blinding = self.options.blinding;
        let (inputs, state, blinded) = on_cpu(move || {
            let (state, blinded) = core
                .blind(&inputs, blinding, &mut OsRng)
                .map_err(|e| Error::Internal(format!("blinding: {e}")))?;
            Ok::<_, Error>((inputs, state, blinded))
        })
        .await??;
        Ok((inputs, state, blinded))
    }

    /// Checks an answer's epoch, verifies its proof (in threshold mode each
    /// key holder's, against its public share, then combines them) and
    /// unblinds, on the rayon pool.
    async fn finalize(
        &self,
        state: BlindState,
        inputs: Vec<Vec<u8>>,
        epoch: u64,
        evaluated: &[u8],
        proof: &[u8],
        partials: &[PartialEvaluation],
    ) -> Result<Vec<Output>> {
        self.check_epoch(epoch)?;
        let generation = partials.first().map_or(0, |p| p.generation);
        if partials.iter().any(|p| p.generation != generation) {
            return Err(Error::Invalid(
                "the server's partial evaluations are of different share generations".into(),
            ));
        }
        let committee = self.committee_for(generation).await?;
        match (&committee, partials.is_empty()) {
            (Some(committee), false) => {
                let partials = partials
                    .iter()
                    .map(partial_from_proto)
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| Error::invalid("a key holder's partial evaluation", e))?;
                let core = Arc::clone(&self.core);
                let committee = Arc::clone(committee);
                return on_cpu(move || {
                    core.finalize_threshold(state, &inputs, &committee, &partials)
                })
                .await?
                .map_err(|e| Error::invalid("verifying the key holders' partial evaluations", e));
            }
            (Some(_), true) => {
                return Err(Error::Invalid(
                    "the server is in threshold mode but answered without its key holders' partial evaluations".into(),
                ))
            }
            (None, false) => {
                return Err(Error::Invalid(
                    "the server sent partial evaluations but announced no key holders in ServerInfo".into(),
                ))
            }
            (None, true) => {}
        }
        let evaluated = unpack_evaluated(evaluated)
            .map_err(|e| Error::invalid("the server's evaluated elements", e))?;
        let proof =
            Proof::from_bytes(proof).map_err(|e| Error::invalid("the server's proof", e))?;
        let core = Arc::clone(&self.core);
        on_cpu(move || core.finalize(state, &inputs, &evaluated, &proof))
            .await?
            .map_err(|e| Error::invalid("verifying the server's evaluation", e))
    }

    pub(super) fn check_epoch(&self, epoch: u64) -> Result<()> {
        if epoch != self.info.key_epoch {
            return Err(Error::Invalid(format!(
                "the server answered under key epoch {epoch}, not the pinned epoch {}; refusing the answer",
                self.info.key_epoch
            )));
        }
        Ok(())
    }

    /// Bucket mode: whether each record is in the registry, without a download.
    ///
    /// # Errors
    /// As [`Session::evaluate`].
    pub async fn bucket_check(&self, records: &[Record]) -> Result<Answers> {
        let p = u8::try_from(self.info.bucket_prefix_bits).unwrap_or(32);
        let max = (self.info.max_bucket_batch as usize).max(1);
        let mut answers = Answers::with_capacity(records.len());
        for chunk in records.chunks(max) {
            let inputs: Vec<Vec<u8>> = chunk.iter().map(Record::encode).collect();
            let buckets: Vec<u32> = chunk.iter().map(|r| r.bucket(p)).collect();
            let (inputs, state, blinded) = self.blind(inputs).await?;
            let message = BucketQueryRequest {
                key_epoch: self.info.key_epoch,
                blinded_elements: pack(blinded.iter().map(|b| &b.0)),
                buckets: buckets.clone(),
                combines_partials: true,
            };
            let response = self
                .ask("querying buckets", || {
                    let mut grpc = self.grpc.clone();
                    let request = self.request(message.clone());
                    async move { grpc.bucket_query(request).await }
                })
                .await?;
            answers.answered_by(response.registry_version);
            let outputs = self
                .finalize(
                    state,
                    inputs,
                    response.key_epoch,
                    &response.evaluated_elements,
                    &response.proof,
                    &response.partials,
                )
                .await?;
            let mut tags_by_bucket = HashMap::new();
            for b in response.buckets {
                let tags =
                    unpack_tags(&b.tags).map_err(|e| Error::invalid("the server's bucket", e))?;
                tags_by_bucket.insert(b.id, tags);
            }
            for (out, bucket) in outputs.iter().zip(&buckets) {
                let tags = tags_by_bucket.get(bucket).ok_or_else(|| {
                    Error::Invalid(format!("the server left out bucket {bucket}"))
                })?;
                answers.found.push(tags.binary_search(&out.tag().0).is_ok());
            }
        }
        Ok(answers)
    }

    /// PIR mode: whether each record is in the registry; the server learns
    /// neither the records nor their buckets. The first check under a key
    /// epoch registers this client's public parameters (Spiral 6-7.9 MB,
    /// YPIR+SP 473 KB, once); each record then costs one query and one
    /// answer (Spiral 16 KiB and 20 KiB per 8 KiB instance; YPIR+SP 7 bytes
    /// a row and 12 KiB a group). When an update has changed the server's
    /// PIR shape, `ServerInfo` is read again and the queries made anew. An
    /// answer that fails its integrity check is an error, never a "no
    /// match".
    ///
    /// # Errors
    /// A server without PIR mode, RPC failures, a stale epoch, a proof or
    /// an answer that does not verify, a shape that keeps changing.
    pub async fn pir_check(&self, records: &[Record]) -> Result<Answers> {
        let max = {
            let info = self.pir_info()?;
            (info.max_batch as usize).max(1)
        };
        let mut answers = Answers::with_capacity(records.len());
        for chunk in records.chunks(max) {
            // An update may change the database's shape: the server refuses
            // queries made for the old one, and they are made again for the
            // new one (twice at most: a replica behind may still serve the
            // old shape once).
            let mut reread = 0;
            let (found, version) = loop {
                match self.pir_chunk(chunk).await {
                    Err(Error::PirShapeChanged { .. }) if reread < 2 => {
                        reread += 1;
                        self.reread_pir_info().await?;
                    }
                    other => break other?,
                }
            };
            answers.answered_by(version);
            answers.found.extend(found);
        }
        Ok(answers)
    }

    /// The PIR shape as last read.
    fn pir_info(&self) -> Result<psi_proto::v1::PirInfo> {
        self.pir_info
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| Error::Unsupported(format!("the server does not offer PIR mode (ServerInfo lists {:?}); use --mode bucket or sync", self.info.modes)))
    }

    /// Reads `ServerInfo.pir` again after the server said its shape
    /// changed; a server at another key or epoch is a rotation, for the
    /// caller to follow.
    async fn reread_pir_info(&self) -> Result<()> {
        let info = self
            .ask("reading ServerInfo again (the PIR shape changed)", || {
                let mut grpc = self.grpc.clone();
                async move {
                    grpc.get_server_info(psi_proto::v1::GetServerInfoRequest {})
                        .await
                }
            })
            .await?;
        if info.public_key != self.info.public_key || info.key_epoch != self.info.key_epoch {
            return Err(Error::StaleEpoch {
                what: "PIR query".into(),
                message: format!(
                    "the server is at key epoch {}, this session at {}",
                    info.key_epoch, self.info.key_epoch
                ),
            });
        }
        tracing::info!(
            "the server's PIR shape changed (a registry update); queries are made for the new one"
        );
        *self
            .pir_info
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = info.pir;
        Ok(())
    }

    /// One request's worth of records under the PIR shape as last read:
    /// whether each is in the registry, and the registry version that
    /// answered.
    async fn pir_chunk(&self, chunk: &[Record]) -> Result<(Vec<bool>, u64)> {
        let info = self.pir_info()?;
        let shape = crate::pir::shape_of(&info)?;
        let p = u8::try_from(self.info.bucket_prefix_bits).unwrap_or(32);
        // The state is locked only to open it and to find or register the
        // keys: concurrent checks of this session (the gateway's callers, a
        // batch's chunks) make queries and wait for answers side by side,
        // and the server may answer them with one pass.
        let client = {
            let mut state = self.pir.lock().await;
            if state
                .as_ref()
                .is_none_or(|s| s.client.shape() != shape || s.epoch != self.info.key_epoch)
            {
                let dir = self.options.cache_dir.clone();
                let key = self.server_key_prefix();
                let epoch = self.info.key_epoch;
                *state = Some(
                    on_cpu(move || crate::pir::PirState::open(&dir, &key, epoch, shape)).await??,
                );
            }
            state
                .as_ref()
                .map(|s| Arc::clone(&s.client))
                .ok_or_else(|| Error::Internal("PIR state missing".into()))?
        };
        let inputs: Vec<Vec<u8>> = chunk.iter().map(Record::encode).collect();
        let buckets: Vec<u32> = chunk.iter().map(|r| r.bucket(p)).collect();
        let asked = buckets.clone();
        let query_client = Arc::clone(&client);
        let queries = on_cpu(move || {
            asked
                .iter()
                .map(|&b| query_client.query(b))
                .collect::<psi_pir::Result<Vec<_>>>()
        })
        .await?
        .map_err(|e| Error::Internal(format!("making a PIR query: {e}")))?;
        let (inputs, blind_state, blinded) = self.blind(inputs).await?;
        let mut message = PirQueryRequest {
            key_epoch: self.info.key_epoch,
            keys_id: Vec::new(),
            blinded_elements: pack(blinded.iter().map(|b| &b.0)),
            queries,
            combines_partials: true,
            shape_id: info.shape_id.clone(),
        };
        let (mut resent, mut forget) = (0, None);
        let response = loop {
            let id = self.pir_keys_id(&client, shape, forget.take()).await?;
            message.keys_id = id.clone();
            let sent = self
                .ask("PIR query", || {
                    let mut grpc = self.grpc.clone();
                    let request = self.request(message.clone());
                    async move { grpc.pir_query(request).await }
                })
                .await;
            match sent {
                Err(Error::PirKeysUnknown { .. }) if resent < 2 => {
                    tracing::info!("the server no longer holds this client's PIR parameters; sending them again");
                    resent += 1;
                    forget = Some(id);
                }
                other => break other?,
            }
        };
        let outputs = self
            .finalize(
                blind_state,
                inputs,
                response.key_epoch,
                &response.evaluated_elements,
                &response.proof,
                &response.partials,
            )
            .await?;
        if response.answers.len() != buckets.len() {
            return Err(Error::Invalid(format!(
                "the server sent {} PIR answers for {} queries",
                response.answers.len(),
                buckets.len()
            )));
        }
        let decode_client = Arc::clone(&client);
        let epoch = response.key_epoch;
        let version = response.registry_version;
        let tags: Vec<u64> = outputs.iter().map(|o| o.tag().0).collect();
        let found = on_cpu(move || {
            buckets
                .iter()
                .zip(&response.answers)
                .zip(&tags)
                .map(|((&b, answer), &tag)| {
                    let fps = decode_client.decode(b, epoch, answer)?;
                    Ok(decode_client.contains(&fps, tag))
                })
                .collect::<psi_pir::Result<Vec<bool>>>()
        })
        .await?
        .map_err(|e| {
            Error::invalid(
                "reading the server's PIR answer (nothing is concluded from it)",
                e,
            )
        })?;
        Ok((found, version))
    }

    /// The id of `client`'s public parameters at the server, registering
    /// them first when the server holds none of this state's, or when it
    /// said it no longer holds `forget` (the id a query was refused with;
    /// another check may have registered them again meanwhile).
    async fn pir_keys_id(
        &self,
        client: &Arc<psi_pir::SchemeClient>,
        shape: psi_pir::PirShape,
        forget: Option<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let mut state = self.pir.lock().await;
        let state = state
            .as_mut()
            .filter(|s| Arc::ptr_eq(&s.client, client))
            .ok_or_else(|| {
                Error::Internal(
                    "the PIR state changed during the check (a key rotation): ask again".into(),
                )
            })?;
        if forget.is_some() && state.keys_id == forget {
            state.keys_id = None;
        }
        if state.keys_id.is_none() {
            self.pir_setup(state, shape).await?;
        }
        state
            .keys_id
            .clone()
            .ok_or_else(|| Error::Internal("PIR public parameters not registered".into()))
    }

    /// Registers this client's public parameters with the server.
    async fn pir_setup(
        &self,
        state: &mut crate::pir::PirState,
        shape: psi_pir::PirShape,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        let pp = on_cpu(state.public_parameters_task()).await??;
        let (nu1, nu2) = match shape {
            psi_pir::PirShape::Spiral(s) => (s.nu1.into(), s.nu2.into()),
            psi_pir::PirShape::Ypir(_) => (0, 0),
        };
        let message = PirSetupRequest {
            key_epoch: self.info.key_epoch,
            nu1,
            nu2,
            public_parameters: pp,
            scheme: shape.scheme().to_string(),
        };
        let response = self
            .ask("registering PIR public parameters", || {
                let mut grpc = self.grpc.clone();
                let request = self.request(message.clone());
                async move { grpc.pir_setup(request).await }
            })
            .await?;
        tracing::info!(
            bytes = message.public_parameters.len(),
            ms = started.elapsed().as_millis() as u64,
            "PIR public parameters registered"
        );
        state.registered(response.keys_id)
    }
}
