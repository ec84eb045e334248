//! `keys …` run directly against the database.

use metlo_shared::KeyType;

use super::args::{meta_arg, update_body, KeysCommand};
use super::output::{list_pages, Output};
use crate::clock::now_ms;
use crate::config::Config;
use crate::db::rows::AuditFilter;
use crate::service::audit::{self, Actor};
use crate::service::credits::Credits;
use crate::service::key_lists;
use crate::service::key_updates::{self, UpdateKeyRequest};
use crate::service::keys::{self, CreateKeyRequest};

/// Directly against the database (and the shared cache, when REDIS_URL is set).
pub(super) async fn local(config: &Config, cmd: &KeysCommand) -> anyhow::Result<Output> {
    let store = config.open_store().await?;
    let actor = Actor::cli();
    let result: anyhow::Result<Output> = async {
        Ok(match cmd {
            KeysCommand::Create {
                name,
                key_type,
                expires_at,
                role,
                meta,
                rate_limit,
                permissions,
                credits,
                identity,
            } => {
                let new = CreateKeyRequest {
                    name: Some(name.clone()),
                    key_for: Some(key_type.clone()),
                    expires_at: expires_at.clone(),
                    role: Some(role.clone()),
                    meta: meta_arg(meta)?,
                    rate_limit: *rate_limit,
                    permissions: Some(permissions.clone()),
                    credits: credits.map(|remaining| Credits {
                        remaining,
                        refill: None,
                    }),
                    identity: identity.clone(),
                }
                .validate(now_ms())?;
                Output::Created(keys::create_key(&store, &new, config.max_api_keys, &actor).await?)
            }
            KeysCommand::List {
                onboarding,
                limit,
                cursor,
            } => {
                let only = onboarding.then_some(KeyType::Onboarding);
                let store = &store;
                let page = |limit: i64, cursor: Option<String>| async move {
                    Ok(key_lists::list_page(store, only, None, limit, cursor.as_deref()).await?)
                };
                list_pages(*limit, cursor.clone(), page).await?
            }
            KeysCommand::Delete { name } => {
                // The CLI on the database is root: it may delete the last admin key.
                keys::delete_key(&store, &config.cache(&store).await?, name, false, &actor).await?;
                Output::Deleted(name.clone())
            }
            KeysCommand::Update { name, .. }
            | KeysCommand::Disable { name }
            | KeysCommand::Enable { name } => {
                let changes = serde_json::from_value::<UpdateKeyRequest>(update_body(cmd)?)?
                    .resolve(&store, now_ms())
                    .await?;
                Output::Updated(
                    key_updates::update_key(
                        &store,
                        &config.cache(&store).await?,
                        name,
                        &changes,
                        &actor,
                    )
                    .await?
                    .info,
                )
            }
            KeysCommand::SetRole { name, role } => {
                let role = keys::parse_role(Some(role))?;
                Output::RoleSet(
                    keys::set_role(&store, &config.cache(&store).await?, name, role, &actor)
                        .await?,
                )
            }
            KeysCommand::Roll {
                name,
                overlap_seconds,
            } => {
                let overlap = keys::overlap(*overlap_seconds)?;
                Output::Rolled(
                    keys::roll_key(&store, &config.cache(&store).await?, name, overlap, &actor)
                        .await?,
                )
            }
            KeysCommand::Seed(_)
            | KeysCommand::KvResync(_)
            | KeysCommand::KvReconcile(_)
            | KeysCommand::LeakedCheck => anyhow::bail!("bulk commands are run by `run`"),
            KeysCommand::Audit {
                limit,
                before,
                action,
                actor,
            } => {
                let (limit, before) = audit::check_page(*limit, *before)?;
                let filter = AuditFilter {
                    action: action.clone(),
                    actor: actor.clone(),
                };
                Output::Audit(audit::page(&store, limit, before, &filter).await?)
            }
        })
    }
    .await;
    store.close().await;
    result
}
