//! The scan of a remote table: its DataFusion `TableProvider` (which filters it takes, the
//! statement a scan sends) and [`RemoteScanExec`], the execution plan that runs the statement on
//! the source's own module and streams the batches back, at most [`READ_AHEAD_BATCHES`] ahead of
//! the query.
//!
//! It must not know a source's SQL (that is `pushdown`) nor how rows become Arrow (`rows`); it
//! must not run a SQLite scan on an async worker.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchReceiverStreamBuilder;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    SendableRecordBatchStream,
};

use super::pushdown::RemoteQuery;
use super::{READ_AHEAD_BATCHES, RemoteColumn, RemoteTable, Source, postgres, sqlite};

#[async_trait]
impl TableProvider for RemoteTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        let pushdown = self.pushdown();
        Ok(filters
            .iter()
            .map(|filter| {
                if pushdown.supports(filter) {
                    // The remote keeps a superset; DataFusion checks again.
                    TableProviderFilterPushDown::Inexact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let projection: Vec<usize> = match projection {
            Some(projection) => projection.clone(),
            None => (0..self.columns.len()).collect(),
        };
        let schema = Arc::new(self.schema.project(&projection)?);
        let query = self.remote_query(&projection, filters, limit);
        let columns = projection
            .iter()
            .map(|&idx| self.columns[idx].clone())
            .collect();
        let table = Arc::new(self.clone());
        Ok(Arc::new(RemoteScanExec::new(table, columns, query, schema)))
    }
}

/// Reads one remote query as a stream of record batches. `EXPLAIN` shows the statement sent.
#[derive(Debug)]
pub(super) struct RemoteScanExec {
    table: Arc<RemoteTable>,
    columns: Vec<RemoteColumn>,
    query: RemoteQuery,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl RemoteScanExec {
    fn new(
        table: Arc<RemoteTable>,
        columns: Vec<RemoteColumn>,
        query: RemoteQuery,
        schema: SchemaRef,
    ) -> RemoteScanExec {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        RemoteScanExec {
            table,
            columns,
            query,
            schema,
            properties: Arc::new(properties),
        }
    }
}

impl DisplayAs for RemoteScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let params: Vec<String> = self.query.params.iter().map(ToString::to_string).collect();
        write!(
            f,
            "RemoteScanExec: federation={}, sql={}, params=[{}]",
            self.table.inner.entry,
            self.query.sql,
            params.join(", ")
        )
    }
}

impl ExecutionPlan for RemoteScanExec {
    fn name(&self) -> &'static str {
        "RemoteScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "RemoteScanExec has no children".into(),
            ))
        }
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "RemoteScanExec has one partition, not {partition}"
            )));
        }
        let mut builder =
            RecordBatchReceiverStreamBuilder::new(Arc::clone(&self.schema), READ_AHEAD_BATCHES);
        let tx = builder.tx();
        let table = Arc::clone(&self.table);
        let columns = self.columns.clone();
        let query = self.query.clone();
        let schema = Arc::clone(&self.schema);
        match &self.table.inner.source {
            Source::Postgres(_) => {
                builder.spawn(postgres::scan_postgres(table, columns, query, schema, tx));
            }
            Source::Sqlite(_) => {
                builder.spawn_blocking(move || {
                    sqlite::scan_sqlite(&table, &columns, &query, schema, &tx)
                });
            }
        }
        Ok(builder.build())
    }
}
