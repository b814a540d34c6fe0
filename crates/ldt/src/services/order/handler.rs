//! The order service's message handler: the final status of each order, when its saga is
//! over.

use ldt_contract::OrderStatus;
use ldt_runtime::bus::Incoming;
use ldt_runtime::consumer::{Delivery, HandleError, Handler};
use tracing::Instrument;
use uuid::Uuid;

use super::service::OrderState;

impl Handler for OrderState {
    async fn handle(&self, msg: &Incoming) -> Result<(), HandleError> {
        let finished = Self::finished(msg)?;
        match self.finish_all(&[finished]).await?.as_slice() {
            [true] => Ok(()),
            _ => Err(HandleError::Poison(format!(
                "OrderFinished for unknown order {}",
                finished.0
            ))),
        }
    }

    /// The batch's final statuses with one statement; if it fails, one message at a time.
    async fn handle_batch(&self, batch: &[Delivery]) -> Vec<Result<(), HandleError>> {
        let parsed: Vec<Result<(Uuid, OrderStatus), HandleError>> =
            batch.iter().map(|d| Self::finished(&d.msg)).collect();
        let valid: Vec<(Uuid, OrderStatus)> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok().copied())
            .collect();
        let known = if valid.len() > 1 {
            self.finish_all(&valid).await.ok()
        } else {
            None
        };
        let Some(known) = known else {
            let mut results = Vec::with_capacity(batch.len());
            for d in batch {
                results.push(self.handle(&d.msg).instrument(d.span.clone()).await);
            }
            return results;
        };
        let mut known = known.into_iter();
        parsed
            .into_iter()
            .map(|p| {
                let (order_id, _) = p?;
                if known.next().unwrap_or(false) {
                    Ok(())
                } else {
                    Err(HandleError::Poison(format!(
                        "OrderFinished for unknown order {order_id}"
                    )))
                }
            })
            .collect()
    }
}
