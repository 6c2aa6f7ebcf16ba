//! Small file helpers: bounded reads, private atomic writes, a byte cursor,
//! and the current Unix time.

use std::{
    fs,
    io::{Read, Write},
    path::Path,
};

use crate::error::{ClientError, Result};

/// Read a whole file of at most `max` bytes.
pub(crate) fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>> {
    let ctx = || format!("reading {}", path.display());
    let f = fs::File::open(path).map_err(|e| ClientError::io(ctx(), e))?;
    let mut out = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| ClientError::io(ctx(), e))?;
    if out.len() as u64 > max {
        return Err(ClientError::Invalid(format!(
            "{} is larger than the limit of {max} bytes",
            path.display()
        )));
    }
    Ok(out)
}

/// Write `bytes` to `path` atomically (temporary file in the same directory,
/// synced, then renamed), readable and writable by the owner only. Creates
/// the parent directory (mode 0700) if needed.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let ctx = || format!("writing {}", path.display());
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_private_dir(dir)?;
    // tempfile creates the file with mode 0600 on Unix.
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| ClientError::io(ctx(), e))?;
    tmp.write_all(bytes)
        .map_err(|e| ClientError::io(ctx(), e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| ClientError::io(ctx(), e))?;
    tmp.persist(path)
        .map_err(|e| ClientError::io(ctx(), e.error))?;
    Ok(())
}

/// Create a directory (and its parents) readable by the owner only.
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
        .map_err(|e| ClientError::io(format!("creating {}", dir.display()), e))
}

/// Unix time in seconds (0 if the clock is before 1970).
///
/// ```
/// assert!(mabe_client::unix_now() > 1_600_000_000);
/// ```
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Unix seconds as UTC text, `YYYY-MM-DD HH:MM:SS UTC` (proleptic Gregorian
/// calendar; negative times are before 1970).
///
/// ```
/// assert_eq!(mabe_client::utc_text(0), "1970-01-01 00:00:00 UTC");
/// assert_eq!(mabe_client::utc_text(1_796_083_200), "2026-12-01 00:00:00 UTC");
/// ```
pub fn utc_text(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A bounds-checked reader over a byte slice.
pub(crate) struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(b: &'a [u8], what: &'static str) -> Self {
        Cursor { b, pos: 0, what }
    }
    pub(crate) fn bad(&self, reason: &str) -> ClientError {
        ClientError::malformed(self.what, reason)
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or_else(|| self.bad("truncated"))?;
        let s = self
            .b
            .get(self.pos..end)
            .ok_or_else(|| self.bad("truncated"))?;
        self.pos = end;
        Ok(s)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub(crate) fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_be_bytes(self.array()?))
    }
    pub(crate) fn lp(&mut self, max: usize) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(self.bad("a field is over its size limit"));
        }
        self.take(n)
    }
    pub(crate) fn string(&mut self, max: usize) -> Result<String> {
        std::str::from_utf8(self.lp(max)?)
            .map(str::to_owned)
            .map_err(|_| self.bad("text is not UTF-8"))
    }
    pub(crate) fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    pub(crate) fn consumed(&self) -> &'a [u8] {
        &self.b[..self.pos]
    }
    pub(crate) fn finish(&self) -> Result<()> {
        if self.pos != self.b.len() {
            return Err(self.bad("trailing bytes"));
        }
        Ok(())
    }
}

/// Append `be32(len) ‖ bytes`.
pub(crate) fn put_lp(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(b);
}

#[cfg(test)]
mod tests {
    use super::utc_text;

    #[test]
    fn utc_text_matches_known_dates() {
        // Expected values from Python's datetime (UTC).
        for (t, want) in [
            (0, "1970-01-01 00:00:00 UTC"),
            (-1, "1969-12-31 23:59:59 UTC"),
            (951_782_400, "2000-02-29 00:00:00 UTC"),
            (1_796_083_200, "2026-12-01 00:00:00 UTC"),
            (4_107_542_399, "2100-02-28 23:59:59 UTC"),
            (-62_135_596_800, "0001-01-01 00:00:00 UTC"),
        ] {
            assert_eq!(utc_text(t), want, "{t}");
        }
        // No panic at the extremes.
        assert!(!utc_text(i64::MAX).is_empty());
        assert!(!utc_text(i64::MIN).is_empty());
    }
}
