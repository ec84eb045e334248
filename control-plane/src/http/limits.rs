//! Size limits on what a request may carry.

/// Largest request body accepted; key requests are tiny.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Largest request head (target URI plus every header's name and value) accepted. hyper's
/// own caps (100 headers, ~400 KB of buffer) stay as the outer bound.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Largest usage report: one of 1,000 entries is about 85 KB.
pub const MAX_REPORT_BYTES: usize = 128 * 1024;
/// Largest leak report: GitHub may send many tokens at once (10,000 are about 2 MB).
pub const MAX_LEAK_REPORT_BYTES: usize = 8 * 1024 * 1024;
/// Leak reports read and handled at once; one more gets 503 (GitHub retries). With
/// [`MAX_LEAK_REPORT_BYTES`], what unauthenticated bodies may hold in memory.
pub const MAX_CONCURRENT_LEAK_REPORTS: usize = 2;
/// Longest a leak report's body may take to arrive (a slot is held meanwhile).
pub const LEAK_REPORT_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
