//! Secrets of this instance (random, made once, shared by replicas through the database).

use super::{Store, StoreError};

impl Store {
    /// The secret named `name`: the one stored, or `fresh` stored now if there is none
    /// (the first of racing replicas wins; every replica then reads the same).
    pub async fn instance_secret(&self, name: &str, fresh: &str) -> Result<String, StoreError> {
        sqlx::query(
            "INSERT INTO instance_secrets (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(fresh)
        .execute(&self.pool)
        .await?;
        let (value,): (String,) =
            sqlx::query_as("SELECT value FROM instance_secrets WHERE name = $1")
                .bind(name)
                .fetch_one(&self.pool)
                .await?;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use crate::db::Store;

    #[tokio::test]
    async fn the_first_secret_stays() {
        let store = Store::memory().await;
        assert_eq!(store.instance_secret("s", "one").await.unwrap(), "one");
        assert_eq!(store.instance_secret("s", "two").await.unwrap(), "one");
        assert_eq!(store.instance_secret("t", "two").await.unwrap(), "two");
    }
}
