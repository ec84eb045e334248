//! The benchmark's floor: a bare axum handler, same runtime and listener setup as the
//! control plane, no auth. `bare-axum <addr>`.

use axum::routing::get;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    eprintln!("listening on http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().route("/api/v1/verify", get(|| async { "OK" }));
    axum::serve(listener, app).await.unwrap();
}
