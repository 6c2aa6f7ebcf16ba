//! The library's one error type.

/// Everything that can go wrong in the proxy library: refused requests,
/// storage failures, serving failures.
///
/// The gRPC adapters map these to statuses in one place
/// ([`crate::grpc::status`]); `Corrupt`, `Backend`, `Internal` and the
/// serving variants are logged and reported as `internal` without detail.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request is malformed: undecodable header or token, bad id or
    /// attribute, an upload whose size or digest does not match.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A size or count limit was exceeded (header, chunk, payload, batch, page).
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// An authority call without a valid, fresh, unreplayed signature by a
    /// trusted authority's identity key.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// An authenticated authority acting outside its own domain.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The record (or freeze) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The record id (or a different key for a trusted authority) already exists.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The operation does not apply in the current state: an upload with
    /// rows at a frozen or superseded version, a freeze while an older
    /// version of the attribute still has rows to update.
    #[error("refused: {0}")]
    FailedPrecondition(String),
    /// The database holds something this code cannot read (corruption, a
    /// newer schema).
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The database failed (connection, I/O, constraint, migration).
    #[error("database error: {0}")]
    Backend(String),
    /// The data directory is missing, not initialised, or a file in it
    /// cannot be read or written.
    #[error("data directory: {0}")]
    DataDir(String),
    /// A call to a proxy failed: the proxy refused it (the code and message
    /// are the proxy's) or the connection failed.
    #[error("proxy call failed ({code:?}): {message}")]
    Rpc {
        /// The gRPC status code.
        code: tonic::Code,
        /// The proxy's message.
        message: String,
    },
    /// Reading a payload to upload, or writing a downloaded one, failed.
    #[error("payload I/O: {0}")]
    Io(String),
    /// TLS material or configuration was refused, or a listener failed.
    #[error("serving: {0}")]
    Serve(String),
    /// A task of the proxy failed (a panic in a blocking section): a bug.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result type of the library.
pub type Result<T, E = ProxyError> = std::result::Result<T, E>;

impl From<tonic::Status> for ProxyError {
    fn from(s: tonic::Status) -> Self {
        ProxyError::Rpc {
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

impl From<tonic::transport::Error> for ProxyError {
    fn from(e: tonic::transport::Error) -> Self {
        ProxyError::Serve(e.to_string())
    }
}
