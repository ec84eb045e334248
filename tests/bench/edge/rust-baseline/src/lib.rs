//! Baselines for the edge benchmark, built exactly like the real Worker, so the ratios
//! measure what our checks cost rather than the `worker` crate's own per-request cost.
//! `MODE = "passthrough"`: proxy every request to ORIGIN_URL. `MODE = "empty"`: answer a
//! constant 401.

#[cfg(target_arch = "wasm32")]
mod glue {
    use worker::*;

    #[event(fetch)]
    async fn fetch(req: Request, env: Env, _ctx: Context) -> Result<Response> {
        if env.var("MODE").map(|v| v.to_string()).unwrap_or_default() == "empty" {
            return Ok(Response::ok("{\"error\":\"unauthorized\"}")?.with_status(401));
        }
        let origin = env.var("ORIGIN_URL")?.to_string();
        let url = req.inner().url();
        let path = url.splitn(4, '/').nth(3).unwrap_or_default();
        let mut init = RequestInit::new();
        init.with_method(req.method())
            .with_headers(req.headers().clone());
        Fetch::Request(Request::new_with_init(&format!("{origin}/{path}"), &init)?)
            .send()
            .await
    }
}
