//! The demo origin for `make dev`: answers every request with a JSON echo of what reached
//! it (method, path, the X-Metlo-Key-* headers the edge added). `demo-origin <port>`.

use std::time::Duration;

use metlo_tests::edge::Origin;

#[tokio::main]
async fn main() {
    let port = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(8081);
    let origin = Origin::start_on(port).await;
    eprintln!("demo origin on {}", origin.url);
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
