//! The lead's writes from the command line: the same client core calls as the console's
//! buttons and the phones' screens. Each write is saved on this machine first (it
//! survives no network), then synced if the relay answers within a few seconds.

use std::time::Duration;

use clap::Subcommand;
use redline_client::{
    Client, NeedCategory, NeedStatus, NewNeed, NewTask, Priority, TaskKind, TaskStatus,
};
use redline_proto::{Day, MemberId, TeamId, ZoneId};

use crate::Failure;

/// `redline task`.
#[derive(Subcommand, Debug)]
pub enum TaskCommand {
    /// Add a task; prints its id.
    Add {
        /// The team.
        #[arg(long)]
        team: String,
        /// The day, YYYY-MM-DD (default: today, UTC).
        #[arg(long)]
        date: Option<String>,
        /// transfer, screening, supply, flow_tracing, inspection or other.
        #[arg(long, default_value = "other")]
        kind: String,
        /// What is to be done.
        #[arg(long)]
        title: String,
        /// The zone it happens in.
        #[arg(long)]
        zone: Option<String>,
        /// Members to assign (repeatable).
        #[arg(long = "assign")]
        assignees: Vec<String>,
    },
    /// Assign a member to a task.
    Assign {
        /// The team.
        #[arg(long)]
        team: String,
        /// The day, YYYY-MM-DD (default: today, UTC).
        #[arg(long)]
        date: Option<String>,
        /// The task id.
        task: String,
        /// The member.
        member: String,
    },
    /// Set a task's status: open, assigned, in_progress, cancelled, done (or reopen).
    Status {
        /// The team.
        #[arg(long)]
        team: String,
        /// The day, YYYY-MM-DD (default: today, UTC).
        #[arg(long)]
        date: Option<String>,
        /// The task id.
        task: String,
        /// The status.
        status: String,
    },
}

/// `redline need`.
#[derive(Subcommand, Debug)]
pub enum NeedCommand {
    /// Record a household's need; prints its id.
    Add {
        /// The zone.
        #[arg(long)]
        zone: String,
        /// The household's id in the zone's book.
        #[arg(long)]
        household: String,
        /// medicine, food, water, garbage, medical_transport, medical_care or other.
        #[arg(long)]
        category: String,
        /// routine, priority, urgent or emergency.
        #[arg(long, default_value = "routine")]
        priority: String,
        /// Details: which medicine, how much food.
        #[arg(long)]
        detail: String,
    },
    /// Assign a volunteer to a need.
    Assign {
        /// The zone.
        #[arg(long)]
        zone: String,
        /// The need id.
        need: String,
        /// The member.
        member: String,
    },
    /// Set a need's status: requested, assigned, in_progress, cancelled, fulfilled (a
    /// delivery is `fulfilled`), or reopen.
    Status {
        /// The zone.
        #[arg(long)]
        zone: String,
        /// The need id.
        need: String,
        /// The status.
        status: String,
    },
    /// Raise or lower a need's priority.
    Priority {
        /// The zone.
        #[arg(long)]
        zone: String,
        /// The need id.
        need: String,
        /// routine, priority, urgent or emergency.
        priority: String,
    },
}

/// `redline duty`.
#[derive(Subcommand, Debug)]
pub enum DutyCommand {
    /// Check in for the team's day.
    In {
        /// The team.
        #[arg(long)]
        team: String,
        /// The day, YYYY-MM-DD (default: today, UTC).
        #[arg(long)]
        date: Option<String>,
    },
    /// Check out.
    Out {
        /// The team.
        #[arg(long)]
        team: String,
        /// The day, YYYY-MM-DD (default: today, UTC).
        #[arg(long)]
        date: Option<String>,
    },
}

/// `redline tally`.
#[derive(Subcommand, Debug)]
pub enum TallyCommand {
    /// Add to one of this member's counters, e.g. `redline tally add --team t3
    /// samples_taken 12`.
    Add {
        /// The team.
        #[arg(long)]
        team: String,
        /// The day, YYYY-MM-DD (default: today, UTC).
        #[arg(long)]
        date: Option<String>,
        /// The metric.
        metric: String,
        /// How much to add.
        amount: u32,
    },
}

fn usage(e: impl std::fmt::Display) -> anyhow::Error {
    Failure::new(2, e.to_string()).into()
}

fn team_day(team: &str, date: Option<String>) -> anyhow::Result<(TeamId, Day)> {
    let day = match date {
        Some(d) => Day::new(d).map_err(usage)?,
        None => crate::lead::today().map_err(usage)?,
    };
    Ok((TeamId::new(team).map_err(usage)?, day))
}

fn member(m: &str) -> anyhow::Result<MemberId> {
    MemberId::new(m).map_err(usage)
}

fn zone(z: &str) -> anyhow::Result<ZoneId> {
    ZoneId::new(z).map_err(usage)
}

/// Syncs if the relay answers soon; the write is saved either way.
async fn saved(client: &Client, what: &str) -> anyhow::Result<()> {
    match tokio::time::timeout(Duration::from_secs(10), client.sync()).await {
        Ok(Ok(r)) if r.refused.is_empty() => println!("{what}; synced"),
        Ok(Ok(r)) => {
            let why: Vec<String> = r.refused.iter().map(|(d, w)| format!("{d}: {w}")).collect();
            println!("{what}; the relay refused: {}", why.join("; "));
        }
        Ok(Err(e)) => println!("{what} on this machine; not synced yet ({e})"),
        Err(_) => {
            println!("{what} on this machine; not synced yet (the relay did not answer in 10 s)")
        }
    }
    Ok(())
}

/// `redline task ...`.
pub async fn task(client: &Client, command: TaskCommand) -> anyhow::Result<()> {
    match command {
        TaskCommand::Add {
            team,
            date,
            kind,
            title,
            zone: z,
            assignees,
        } => {
            let (team, day) = team_day(&team, date)?;
            let mut task = NewTask::new(TaskKind::parse(&kind).map_err(usage)?, title);
            task.zone = z.as_deref().map(zone).transpose()?;
            task.assignees = assignees
                .iter()
                .map(|m| member(m))
                .collect::<Result<_, _>>()?;
            let id = client.add_task(&team, &day, task)?;
            println!("{id}");
            saved(
                client,
                &format!("task {id} added to {team}, {}", day.as_str()),
            )
            .await
        }
        TaskCommand::Assign {
            team,
            date,
            task,
            member: m,
        } => {
            let (team, day) = team_day(&team, date)?;
            client.assign_task(&team, &day, &task, &member(&m)?)?;
            saved(client, &format!("{m} assigned to task {task}")).await
        }
        TaskCommand::Status {
            team,
            date,
            task,
            status,
        } => {
            let (team, day) = team_day(&team, date)?;
            if status == "reopen" {
                client.reopen_task(&team, &day, &task)?;
            } else {
                client.set_task_status(
                    &team,
                    &day,
                    &task,
                    status.parse::<TaskStatus>().map_err(usage)?,
                )?;
            }
            saved(client, &format!("task {task} is now {status}")).await
        }
    }
}

/// `redline need ...`.
pub async fn need(client: &Client, command: NeedCommand) -> anyhow::Result<()> {
    match command {
        NeedCommand::Add {
            zone: z,
            household,
            category,
            priority,
            detail,
        } => {
            let z = zone(&z)?;
            let need = NewNeed {
                household,
                category: NeedCategory::parse(&category).map_err(usage)?,
                detail,
                priority: Priority::parse(&priority).map_err(usage)?,
            };
            let id = client.add_need(&z, need)?;
            println!("{id}");
            saved(client, &format!("need {id} recorded in {z}")).await
        }
        NeedCommand::Assign {
            zone: z,
            need,
            member: m,
        } => {
            client.assign_need(&zone(&z)?, &need, &member(&m)?)?;
            saved(client, &format!("{m} assigned to need {need}")).await
        }
        NeedCommand::Status {
            zone: z,
            need,
            status,
        } => {
            let z = zone(&z)?;
            if status == "reopen" {
                client.reopen_need(&z, &need)?;
            } else {
                client.set_need_status(&z, &need, status.parse::<NeedStatus>().map_err(usage)?)?;
            }
            saved(client, &format!("need {need} is now {status}")).await
        }
        NeedCommand::Priority {
            zone: z,
            need,
            priority,
        } => {
            client.set_need_priority(
                &zone(&z)?,
                &need,
                Priority::parse(&priority).map_err(usage)?,
            )?;
            saved(client, &format!("need {need} is now {priority}")).await
        }
    }
}

/// `redline duty ...`.
pub async fn duty(client: &Client, command: DutyCommand) -> anyhow::Result<()> {
    match command {
        DutyCommand::In { team, date } => {
            let (team, day) = team_day(&team, date)?;
            client.check_in(&team, &day)?;
            saved(client, &format!("checked in for {team}, {}", day.as_str())).await
        }
        DutyCommand::Out { team, date } => {
            let (team, day) = team_day(&team, date)?;
            client.check_out(&team, &day)?;
            saved(client, &format!("checked out of {team}, {}", day.as_str())).await
        }
    }
}

/// `redline tally ...`.
pub async fn tally(client: &Client, command: TallyCommand) -> anyhow::Result<()> {
    match command {
        TallyCommand::Add {
            team,
            date,
            metric,
            amount,
        } => {
            let (team, day) = team_day(&team, date)?;
            client.add_to_tally(&team, &day, &metric, amount)?;
            saved(
                client,
                &format!("{metric} +{amount} for {team}, {}", day.as_str()),
            )
            .await
        }
    }
}
