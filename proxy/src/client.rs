//! Storing and fetching records: a small async client of the `RecordStore`
//! service for writers and readers.
//!
//! Payloads stream in both directions in constant memory: [`RecordClient::put`]
//! reads from any [`std::io::Read`] on a blocking thread, [`RecordClient::get`]
//! writes into any [`std::io::Write`] on a blocking thread and checks the
//! payload's size and SHA-256 against what the proxy recorded at upload.
//! The proxy is not trusted for integrity: decrypting the record (which
//! authenticates every payload segment and the header) is what proves it.
//!
//! Authorities do not use this module: they call `ProxyAuthority` with the
//! generated client and [`mabe_proto::signing::sign_proxy_request`].

use std::io::{Read, Write};

use mabe_proto::v1::{
    DeleteRecordRequest, GetProxyInfoRequest, GetRecordRequest, ListRecordsRequest,
    ListRecordsResponse, PutRecordFinish, PutRecordRequest, get_record_response,
    put_record_request, record_store_client::RecordStoreClient,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::error::{ProxyError, Result};
use crate::store::RecordId;
use crate::{MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES};

/// Bytes read from the payload per upload message.
const UPLOAD_CHUNK: usize = 256 * 1024;

/// A client of one proxy's `RecordStore` service.
#[derive(Debug, Clone)]
pub struct RecordClient {
    inner: RecordStoreClient<Channel>,
}

impl RecordClient {
    /// Connect over TLS to `url` (`https://host:port`), trusting the PEM
    /// certificate(s) `ca_pem` and expecting the server name `domain`.
    pub async fn connect(url: &str, ca_pem: &[u8], domain: &str) -> Result<Self> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .domain_name(domain);
        let channel = Endpoint::from_shared(url.to_owned())
            .map_err(|e| ProxyError::InvalidArgument(format!("proxy URL: {e}")))?
            .tls_config(tls)?
            .connect()
            .await?;
        Ok(Self::from_channel(channel))
    }

    /// Use an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        RecordClient {
            inner: RecordStoreClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }

    /// The proxy's id (what authorities sign for).
    pub async fn proxy_id(&mut self) -> Result<String> {
        Ok(self
            .inner
            .get_proxy_info(GetProxyInfoRequest {})
            .await?
            .into_inner()
            .proxy_id)
    }

    /// Upload a record: `header` (FORMAT.md 'H') and the payload read from
    /// `payload` until end of file. Returns the record id once the proxy has
    /// durably committed the record.
    pub async fn put<R: Read + Send + 'static>(
        &mut self,
        header: &[u8],
        mut payload: R,
    ) -> Result<RecordId> {
        let (tx, rx) = mpsc::channel::<PutRecordRequest>(4);
        let first = PutRecordRequest {
            part: Some(put_record_request::Part::Header(header.to_vec())),
        };
        tx.send(first)
            .await
            .map_err(|_| ProxyError::Io("upload channel closed".into()))?;
        let reader = tokio::task::spawn_blocking(move || -> Result<()> {
            let mut sha = Sha256::new();
            let mut size = 0u64;
            let mut buf = vec![0u8; UPLOAD_CHUNK.min(MAX_CHUNK_BYTES)];
            loop {
                let n = match payload.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(ProxyError::Io(format!("reading the payload: {e}"))),
                };
                let data = buf.get(..n).unwrap_or_default().to_vec();
                sha.update(&data);
                size += n as u64;
                let msg = PutRecordRequest {
                    part: Some(put_record_request::Part::Chunk(data)),
                };
                if tx.blocking_send(msg).is_err() {
                    // The call ended early; its status says why.
                    return Ok(());
                }
            }
            let finish = PutRecordRequest {
                part: Some(put_record_request::Part::Finish(PutRecordFinish {
                    payload_size: size,
                    payload_sha256: sha.finalize().to_vec(),
                })),
            };
            let _ = tx.blocking_send(finish);
            Ok(())
        });
        let call = self.inner.put_record(ReceiverStream::new(rx)).await;
        let read = reader
            .await
            .map_err(|e| ProxyError::Io(format!("payload reader failed: {e}")))?;
        read?;
        let resp = call?.into_inner();
        resp.record_id.as_slice().try_into().map_err(|_| {
            ProxyError::InvalidArgument("the proxy answered a malformed record id".into())
        })
    }

    /// Download a record: returns its current header and `out` after the
    /// whole payload was written to it and its size and SHA-256 matched.
    pub async fn get<W: Write + Send + 'static>(
        &mut self,
        record_id: &RecordId,
        out: W,
    ) -> Result<(Vec<u8>, W)> {
        self.get_with(record_id, move |_| Ok(out)).await
    }

    /// Download a record, choosing the payload's writer once the current
    /// header is known: `begin` gets the header (before any payload byte) and
    /// returns the writer, e.g. after writing the header into it. Runs on a
    /// blocking thread, like the writes. Returns the header and the writer
    /// after the whole payload was written and its size and SHA-256 matched.
    pub async fn get_with<W, F>(&mut self, record_id: &RecordId, begin: F) -> Result<(Vec<u8>, W)>
    where
        W: Write + Send + 'static,
        F: FnOnce(&[u8]) -> Result<W> + Send + 'static,
    {
        let mut stream = self
            .inner
            .get_record(GetRecordRequest {
                record_id: record_id.to_vec(),
            })
            .await?
            .into_inner();
        let head = match stream.message().await?.and_then(|m| m.part) {
            Some(get_record_response::Part::Head(h)) => h,
            _ => {
                return Err(ProxyError::InvalidArgument(
                    "the proxy's answer does not start with the record head".into(),
                ));
            }
        };
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
        let header = head.header.clone();
        let writer = tokio::task::spawn_blocking(move || -> Result<(W, u64, [u8; 32])> {
            let mut out = begin(&header)?;
            let mut sha = Sha256::new();
            let mut size = 0u64;
            while let Some(data) = rx.blocking_recv() {
                out.write_all(&data)
                    .map_err(|e| ProxyError::Io(format!("writing the payload: {e}")))?;
                sha.update(&data);
                size += data.len() as u64;
            }
            out.flush()
                .map_err(|e| ProxyError::Io(format!("writing the payload: {e}")))?;
            Ok((out, size, sha.finalize().into()))
        });
        let mut failure = None;
        loop {
            match stream.message().await {
                Ok(Some(m)) => match m.part {
                    Some(get_record_response::Part::Chunk(c)) => {
                        if tx.send(c).await.is_err() {
                            break;
                        }
                    }
                    _ => {
                        failure = Some(ProxyError::InvalidArgument(
                            "unexpected message in the payload stream".into(),
                        ));
                        break;
                    }
                },
                Ok(None) => break,
                Err(s) => {
                    failure = Some(s.into());
                    break;
                }
            }
        }
        drop(tx);
        let (out, size, sha) = writer
            .await
            .map_err(|e| ProxyError::Io(format!("payload writer failed: {e}")))??;
        if let Some(e) = failure {
            return Err(e);
        }
        if size != head.payload_size || sha.as_slice() != head.payload_sha256.as_slice() {
            return Err(ProxyError::InvalidArgument(format!(
                "the payload received ({size} bytes) does not match the record's size or digest"
            )));
        }
        Ok((head.header, out))
    }

    /// One page of the record listing (`page_token` empty for the first).
    pub async fn list(&mut self, page_token: &[u8], page_size: u32) -> Result<ListRecordsResponse> {
        Ok(self
            .inner
            .list_records(ListRecordsRequest {
                page_token: page_token.to_vec(),
                page_size,
            })
            .await?
            .into_inner())
    }

    /// Delete a record.
    pub async fn delete(&mut self, record_id: &RecordId) -> Result<()> {
        self.inner
            .delete_record(DeleteRecordRequest {
                record_id: record_id.to_vec(),
            })
            .await?;
        Ok(())
    }
}
