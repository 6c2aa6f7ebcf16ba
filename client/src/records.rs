//! Records at a record store (`mabe-proxy`).
//!
//! A record store keeps a record as two parts: a ciphertext header, which it
//! validates and which revocation updates in place, and an opaque payload,
//! which it never reads. A signed record container (`docs/FORMAT.md` §9.1)
//! maps onto them without any new format:
//!
//! ```text
//! container = "MABE" ‖ 'R' ‖ 0x01 ‖ be32(L) ‖ header (L bytes) ‖ rest
//! stored    = header                        (the proxy's header)
//!           + rest                          (the proxy's payload: signer, payload, signature)
//! ```
//!
//! [`put`] splits a container read from any reader and streams `rest` to the
//! proxy; [`get`] writes `"MABE" ‖ 'R' ‖ 0x01 ‖ be32(L) ‖ current header`
//! followed by the stored `rest`, so what comes back is a container again,
//! with the header as revocation left it. The writer's signature covers only
//! header fields that revocation never changes (FORMAT.md §9.1), so it still
//! verifies. The proxy is not trusted for anything: a fetched record is
//! believed only once it decrypts and its signature verifies.
//!
//! ```no_run
//! # async fn demo(p: &mabe_client::trust::ProxyEndpoint) -> Result<(), Box<dyn std::error::Error>> {
//! let mut store = mabe_client::records::connect(p).await?;
//! let id = mabe_client::records::put(&mut store, &p.id, std::fs::File::open("scan.mabe")?).await?;
//! let out = std::fs::File::create("again.mabe")?;
//! mabe_client::records::get(&mut store, &p.id, &id, out).await?;
//! # Ok(()) }
//! ```

use std::io::{Read, Write};

use mabe_abe::{Header, MAX_HEADER_LEN};
use mabe_proxy::{ProxyError, client::RecordClient};

use crate::{
    error::{ClientError, Result},
    record::RECORD_MAGIC,
    trust::ProxyEndpoint,
};

/// A record id at a record store: the header's 16-byte `rid`.
pub type RecordId = [u8; 16];

fn store_error(proxy: &str, e: ProxyError) -> ClientError {
    ClientError::RecordStore {
        proxy: proxy.to_owned(),
        detail: e.to_string(),
    }
}

/// Connect over TLS to a record store listed in the trust file.
pub async fn connect(p: &ProxyEndpoint) -> Result<RecordClient> {
    RecordClient::connect(&p.endpoint, &p.tls_root, &p.tls_name)
        .await
        .map_err(|e| store_error(&p.id, e))
}

/// Parse a record id given as 32 hexadecimal digits.
///
/// ```
/// let id = mabe_client::records::parse_id("000102030405060708090a0b0c0d0e0f")?;
/// assert_eq!(id[15], 15);
/// assert!(mabe_client::records::parse_id("xyz").is_err());
/// # Ok::<(), mabe_client::ClientError>(())
/// ```
pub fn parse_id(text: &str) -> Result<RecordId> {
    hex::decode(text.trim())
        .ok()
        .and_then(|b| RecordId::try_from(b).ok())
        .ok_or_else(|| ClientError::Invalid("a record id is 32 hexadecimal digits".into()))
}

/// Read a container's magic and header from `input` (the header decoded
/// with every check of FORMAT.md §3.1); `input` is left at the signer byte.
fn read_header<R: Read>(input: &mut R) -> Result<(Header, Vec<u8>)> {
    let mut first = [0u8; 10];
    input
        .read_exact(&mut first)
        .map_err(|_| ClientError::malformed("record", "truncated"))?;
    if first[..6] != RECORD_MAGIC {
        return Err(ClientError::malformed(
            "record",
            "not a signed record container (write one with `mabe encrypt`)",
        ));
    }
    let len = u32::from_be_bytes([first[6], first[7], first[8], first[9]]) as usize;
    if len > MAX_HEADER_LEN {
        return Err(ClientError::malformed(
            "record",
            "header over its size limit",
        ));
    }
    let mut header_bytes = vec![0u8; len];
    input
        .read_exact(&mut header_bytes)
        .map_err(|_| ClientError::malformed("record", "truncated"))?;
    let header = Header::from_bytes(&header_bytes)?;
    Ok((header, header_bytes))
}

/// Store the record container read from `input` at the record store
/// `proxy_id` (used in messages); returns its record id once the store has
/// durably committed it. The payload streams: memory stays constant.
pub async fn put<R: Read + Send + 'static>(
    store: &mut RecordClient,
    proxy_id: &str,
    mut input: R,
) -> Result<RecordId> {
    let (_, header_bytes) = read_header(&mut input)?;
    store
        .put(&header_bytes, input)
        .await
        .map_err(|e| store_error(proxy_id, e))
}

/// Fetch record `id` from the record store `proxy_id` into `output` as a
/// record container (see the module documentation); returns `output`. The
/// header is checked with every rule of FORMAT.md §3.1 before anything is
/// written, and the payload's size and SHA-256 against what the store
/// recorded at upload.
pub async fn get<W: Write + Send + 'static>(
    store: &mut RecordClient,
    proxy_id: &str,
    id: &RecordId,
    output: W,
) -> Result<W> {
    let (_, out) = store
        .get_with(id, move |header: &[u8]| {
            Header::from_bytes(header).map_err(|e| {
                ProxyError::InvalidArgument(format!("the store returned a bad header: {e}"))
            })?;
            let mut out = output;
            let len = u32::try_from(header.len())
                .map_err(|_| ProxyError::InvalidArgument("header too long".into()))?;
            out.write_all(&RECORD_MAGIC)
                .and_then(|()| out.write_all(&len.to_be_bytes()))
                .and_then(|()| out.write_all(header))
                .map_err(|e| ProxyError::Io(format!("writing the record: {e}")))?;
            Ok(out)
        })
        .await
        .map_err(|e| store_error(proxy_id, e))?;
    Ok(out)
}
