//! What a `keys` command produced, printed as a table or as the API's JSON.

use comfy_table::{presets, Table};
use metlo_shared::RateLimit;
use serde_json::{json, Value};

use crate::service::audit::AuditPage;
use crate::service::key_lists::{self, KeyPage};
use crate::service::keys::{CreatedKey, KeyInfo, RolledKey};

/// What a command produced, whichever way it ran.
pub(super) enum Output {
    Created(CreatedKey),
    Rolled(RolledKey),
    Deleted(String),
    RoleSet(KeyInfo),
    Updated(KeyInfo),
    Keys(Vec<KeyInfo>),
    /// One page, when only one was asked for.
    KeyPage(KeyPage),
    Audit(AuditPage),
}

pub(super) fn print(output: &Output, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        let json = match output {
            Output::Created(k) => serde_json::to_value(k)?,
            Output::Rolled(k) => serde_json::to_value(k)?,
            Output::Deleted(_) => json!({"status": "OK"}),
            Output::RoleSet(k) | Output::Updated(k) => serde_json::to_value(k)?,
            Output::Keys(k) => serde_json::to_value(k)?,
            Output::KeyPage(p) => serde_json::to_value(p)?,
            Output::Audit(p) => serde_json::to_value(p)?,
        };
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    match output {
        // The key alone on stdout, so `KEY=$(… keys create …)` works.
        Output::Created(k) => {
            eprintln!(
                "Created {} key {:?} ({}, role {}). It is shown only this once:",
                k.info.key_for, k.info.name, k.info.identifier, k.info.role
            );
            println!("{}", k.api_key);
        }
        Output::Rolled(k) => {
            eprintln!(
                "Rolled {} key {:?} ({}). It is shown only this once:",
                k.info.key_for, k.info.name, k.info.identifier
            );
            eprintln!(
                "The previous secret ({}) works until {}.",
                k.previous_identifier, k.previous_valid_until
            );
            println!("{}", k.api_key);
        }
        Output::Deleted(name) => eprintln!("Deleted key {name:?}"),
        Output::RoleSet(k) => eprintln!("Key {:?} now has the role {}", k.name, k.role),
        Output::Updated(k) => eprintln!(
            "Key {:?} updated: {}, expires {}, meta {}, rate limit {}, permissions {}",
            k.name,
            if k.enabled { "enabled" } else { "disabled" },
            or_dash(&k.expires_at),
            k.meta.as_ref().map_or("-".to_owned(), Value::to_string),
            rate_limit_text(k.rate_limit),
            permissions_text(&k.permissions),
        ),
        Output::Keys(keys) => print_keys(keys, None),
        Output::KeyPage(page) => print_keys(&page.keys, page.next_cursor.as_deref()),
        Output::Audit(page) => {
            let mut table = new_table(&["ID", "AT", "ACTOR", "ACTION", "TARGET", "IP", "DETAIL"]);
            for e in &page.entries {
                table.add_row([
                    e.id.to_string(),
                    e.at.clone(),
                    or_dash(&e.actor),
                    e.action.clone(),
                    or_dash(&e.target),
                    or_dash(&e.ip),
                    e.detail.to_string(),
                ]);
            }
            println!("{table}");
            if let Some(next) = page.next_before {
                eprintln!("More: --before {next}");
            }
        }
    }
    Ok(())
}

fn or_dash(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".to_owned())
}

/// A table of keys; `next`: the cursor of the page after them.
fn print_keys(keys: &[KeyInfo], next: Option<&str>) {
    let mut table = new_table(&[
        "NAME",
        "IDENTIFIER",
        "TYPE",
        "ROLE",
        "CREATED",
        "EXPIRES",
        "LAST USED",
        "ENABLED",
        "RATE LIMIT",
        "PERMISSIONS",
    ]);
    for k in keys {
        table.add_row([
            k.name.clone(),
            k.identifier.clone(),
            k.key_for.to_string(),
            k.role.to_string(),
            k.created.clone(),
            or_dash(&k.expires_at),
            or_dash(&k.last_used),
            if k.enabled { "yes" } else { "no" }.to_owned(),
            rate_limit_text(k.rate_limit),
            permissions_text(&k.permissions),
        ]);
    }
    println!("{table}");
    if let Some(next) = next {
        eprintln!("More: --cursor {next}");
    }
}

/// One page (`--limit` or `--cursor` given), or every key, a page of the most at a time.
pub(super) async fn list_pages<F, Fut>(
    limit: Option<i64>,
    cursor: Option<String>,
    page: F,
) -> anyhow::Result<Output>
where
    F: Fn(i64, Option<String>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<KeyPage>>,
{
    if limit.is_some() || cursor.is_some() {
        let p = page(limit.unwrap_or(key_lists::DEFAULT_LIST_PAGE), cursor).await?;
        return Ok(Output::KeyPage(p));
    }
    let (mut all, mut cursor) = (Vec::new(), None);
    loop {
        let p = page(key_lists::MAX_LIST_PAGE, cursor).await?;
        all.extend(p.keys);
        match p.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(Output::Keys(all)),
        }
    }
}

fn permissions_text(permissions: &[String]) -> String {
    if permissions.is_empty() {
        "-".to_owned()
    } else {
        permissions.join(",")
    }
}

fn rate_limit_text(limit: Option<RateLimit>) -> String {
    limit.map_or("-".to_owned(), |l| {
        format!("{}/{}s", l.requests, l.period_seconds)
    })
}

fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(header.to_vec());
    table
}
