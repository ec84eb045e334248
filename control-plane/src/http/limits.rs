//! Size limits on what a request may carry.

/// Largest request body accepted; key requests are tiny.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Largest request head (target URI plus every header's name and value) accepted. hyper's
/// own caps (100 headers, ~400 KB of buffer) stay as the outer bound.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Largest usage report (an edge key's, read after its key is checked): 1,000 keys, each
/// admitted and refused for every reason, are at most ~430 KB (the edge's
/// `usage::MAX_REPORT_BYTES` mirrors this; its test measures a full batch).
pub const MAX_REPORT_BYTES: usize = 512 * 1024;
/// Largest leak report: GitHub may send many tokens at once (10,000 are about 2 MB).
pub const MAX_LEAK_REPORT_BYTES: usize = 8 * 1024 * 1024;
/// A leak report announced at most this long is read in the small pool (GitHub's reports
/// are a few tokens: ~200 bytes each).
pub const SMALL_LEAK_REPORT_BYTES: usize = 256 * 1024;
/// Small leak reports read at once; one more gets 503 (GitHub retries).
pub const SMALL_LEAK_REPORTS: usize = 32;
/// Larger (or unannounced) leak reports read at once. With the small pool, what
/// unauthenticated bodies may hold in memory: 32 × 256 KiB + 2 × 8 MiB = 24 MiB.
pub const LARGE_LEAK_REPORTS: usize = 2;

/// How long a leak report's body may take to arrive (a slot is held meanwhile): 5 s, and
/// 1 s more per 256 KiB announced (unannounced: as much as the largest may take, 37 s).
pub fn leak_report_read_timeout(announced: Option<u64>) -> std::time::Duration {
    let bytes = announced.unwrap_or(MAX_LEAK_REPORT_BYTES as u64);
    let chunks = bytes.div_ceil(SMALL_LEAK_REPORT_BYTES as u64);
    std::time::Duration::from_secs(5 + chunks)
}
