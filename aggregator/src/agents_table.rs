//! The `agents` table: every agent that ever stored a batch (from the WAL's high-water marks),
//! joined with what its open connection reports now (from [`ConnectedAgents`]). Built anew at
//! each scan, so it is as fresh as the query.

use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
    UInt64Builder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;

use crate::ingest::ConnectedAgents;
use crate::wal::WeakWal;

static AGENTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("agent_id", DataType::Utf8, false),
        Field::new("connected", DataType::Boolean, false),
        Field::new("remote", DataType::Utf8, true),
        Field::new("agent_version", DataType::Utf8, true),
        Field::new("connected_since", ts(), true),
        Field::new("last_heartbeat", ts(), true),
        Field::new("buffered_events", DataType::UInt64, true),
        Field::new("buffered_bytes", DataType::UInt64, true),
        // The last sequence number stored for the agent, and when it moved.
        Field::new("last_seq", DataType::UInt64, false),
        Field::new("last_stored", ts(), false),
        Field::new("events_stored_this_connection", DataType::UInt64, true),
    ]))
});

pub struct AgentsTable {
    pub agents: Arc<ConnectedAgents>,
    /// Weak: the table lives as long as the query engine and must not keep the WAL writer up.
    pub wal: WeakWal,
}

impl std::fmt::Debug for AgentsTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentsTable").finish_non_exhaustive()
    }
}

impl AgentsTable {
    async fn batch(&self) -> DfResult<RecordBatch> {
        let wal = self.wal.upgrade().ok_or_else(|| {
            DataFusionError::Execution("the aggregator is shutting down".to_owned())
        })?;
        let stored = wal
            .stored_agents()
            .await
            .map_err(|error| DataFusionError::External(error.into()))?;
        let connected = self.agents.snapshot().agents;
        let n = stored.len();
        let ts = || TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut agent_id = StringBuilder::new();
        let mut is_connected = BooleanBuilder::with_capacity(n);
        let mut remote = StringBuilder::new();
        let mut version = StringBuilder::new();
        let mut since = ts();
        let mut heartbeat = ts();
        let mut buffered_events = UInt64Builder::with_capacity(n);
        let mut buffered_bytes = UInt64Builder::with_capacity(n);
        let mut last_seq = UInt64Builder::with_capacity(n);
        let mut last_stored = ts();
        let mut stored_now = UInt64Builder::with_capacity(n);
        for agent in &stored {
            // An agent may hold two connections for a moment (a reconnect): take the newest.
            let connection = connected
                .iter()
                .filter(|c| c.agent_id == agent.agent_id)
                .max_by_key(|c| c.connected_since_unix_ms);
            agent_id.append_value(&agent.agent_id);
            is_connected.append_value(connection.is_some());
            remote.append_option(connection.map(|c| c.remote.as_str()));
            version.append_option(connection.map(|c| c.agent_version.as_str()));
            since.append_option(connection.map(|c| c.connected_since_unix_ms));
            heartbeat.append_option(connection.and_then(|c| c.last_heartbeat_unix_ms));
            buffered_events.append_option(connection.and_then(|c| c.n_buffered_events));
            buffered_bytes.append_option(connection.and_then(|c| c.buffered_bytes));
            last_seq.append_value(agent.high_water_mark);
            last_stored.append_value(agent.updated_unix_ms);
            stored_now.append_option(connection.map(|c| c.n_events_stored));
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(agent_id.finish()),
            Arc::new(is_connected.finish()),
            Arc::new(remote.finish()),
            Arc::new(version.finish()),
            Arc::new(since.finish()),
            Arc::new(heartbeat.finish()),
            Arc::new(buffered_events.finish()),
            Arc::new(buffered_bytes.finish()),
            Arc::new(last_seq.finish()),
            Arc::new(last_stored.finish()),
            Arc::new(stored_now.finish()),
        ];
        Ok(RecordBatch::try_new(AGENTS_SCHEMA.clone(), columns)?)
    }
}

#[async_trait]
impl TableProvider for AgentsTable {
    fn schema(&self) -> SchemaRef {
        AGENTS_SCHEMA.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let batch = self.batch().await?;
        let memory = MemTable::try_new(AGENTS_SCHEMA.clone(), vec![vec![batch]])?;
        memory.scan(state, projection, filters, limit).await
    }
}
