//! The CRM read models: customers, their identifiers, tickets, the
//! conversations behind them and every message.

mod conversations;
mod customers;
mod identifiers;
mod messages;
mod tickets;

use std::sync::Arc;

pub use conversations::ConversationsProjector;
pub use customers::CustomersProjector;
pub use identifiers::IdentifiersProjector;
pub use messages::MessagesProjector;
pub use tickets::{ShadowTickets, TicketsProjector};

use crate::Projector;

pub fn projectors() -> Vec<Arc<dyn Projector>> {
    vec![
        Arc::new(CustomersProjector),
        Arc::new(IdentifiersProjector),
        Arc::new(TicketsProjector),
        Arc::new(ConversationsProjector),
        Arc::new(MessagesProjector),
    ]
}
