// The Redline FFI exercised from Kotlin on the JVM, through the same generated bindings
// an Android app uses. Starts the real relay binary on loopback, syncs two clients and
// checks every mapped error. Exits non-zero on the first failure.
//
// Usage: java ... RedlineTestKt <path to redline-server> <scratch dir>

import java.io.File
import java.util.concurrent.CopyOnWriteArrayList
import java.util.concurrent.TimeUnit
import kotlin.system.exitProcess
import kotlinx.coroutines.runBlocking
import org.redline.ffi.*

fun check(ok: Boolean, what: String) {
    if (!ok) throw AssertionError(what)
    println("ok - $what")
}

/** Waits up to [ms] for [cond]. */
fun eventually(ms: Long, cond: () -> Boolean): Boolean {
    val until = System.currentTimeMillis() + ms
    while (System.currentTimeMillis() < until) {
        if (cond()) return true
        Thread.sleep(20)
    }
    return cond()
}

class Relay(private val exe: String, val dataDir: File) {
    private val process: Process
    val address: String
    val fingerprint: String

    init {
        process = ProcessBuilder(exe, "serve", "--data-dir", dataDir.path, "--listen", "127.0.0.1:0")
            .redirectError(File(dataDir.parentFile, "relay.log"))
            .start()
        val out = process.inputStream.bufferedReader()
        var addr: String? = null
        var pin: String? = null
        val deadline = System.currentTimeMillis() + 30_000
        while ((addr == null || pin == null) && System.currentTimeMillis() < deadline) {
            val line = out.readLine() ?: break
            val words = line.trim().split(Regex("\\s+"))
            if (words.firstOrNull() == "listening") addr = words[2]
            if (words.firstOrNull() == "fingerprint") pin = words[1]
        }
        address = addr ?: error("relay printed no address")
        fingerprint = pin ?: error("relay printed no fingerprint")
        Thread { out.forEachLine { } }.apply { isDaemon = true }.start()
    }

    fun token(dataDir: File, member: String, device: String, teams: String, zones: String): String {
        val p = ProcessBuilder(exe, "token", "issue", "--data-dir", dataDir.path, "--member", member,
            "--device", device, "--role", "volunteer", "--team", teams, "--zones", zones, "--ttl", "1d")
            .redirectError(ProcessBuilder.Redirect.DISCARD)
            .start()
        val token = p.inputStream.bufferedReader().readText().trim()
        check(p.waitFor(30, TimeUnit.SECONDS) && p.exitValue() == 0, "token issued for $device")
        return token
    }

    fun stop() {
        process.destroy()
        process.waitFor(10, TimeUnit.SECONDS)
    }
}

class Changes : ChangeObserver {
    val seen = CopyOnWriteArrayList<Pair<List<String>, Boolean>>()
    val threads = CopyOnWriteArrayList<String>()
    override fun documentsChanged(documents: List<String>, bySync: Boolean) {
        threads.add(Thread.currentThread().name)
        seen.add(documents to bySync)
    }
    fun saw(doc: String, bySync: Boolean) = seen.any { (docs, s) -> s == bySync && doc in docs }
}

class Statuses : SyncStatusObserver {
    val seen = CopyOnWriteArrayList<SyncStatus>()
    override fun syncStatusChanged(status: SyncStatus) {
        seen.add(status)
    }
}

fun settings(member: String, relay: Relay, token: String?) = ClientSettings(
    member = member, org = null, relay = RelaySettings(relay.address, relay.fingerprint),
    token = token, teams = listOf("team-1"), zones = listOf("z1"), keepDays = 7u,
)

fun run(exe: String, scratch: File) {
    val started = System.nanoTime()
    val relay = Relay(exe, File(scratch, "relay").apply { mkdirs() })
    try {
        val day = "2026-11-29"
        val ledgerDoc = "ledger/team-1/$day"
        check(protocolVersion().toInt() == 2, "protocol version crosses the boundary")

        // Phone A: writes offline, reads back, observers fire on a background thread.
        val a = RedlineClient.open(File(scratch, "a").path,
            settings("ana", relay, relay.token(relay.dataDir, "ana", "phone-a", "team-1", "z1")))
        check(a.deviceId() == "phone-a", "the device takes its id from its token")
        val changes = Changes()
        val statuses = Statuses()
        a.setChangeObserver(changes)
        a.setSyncStatusObserver(statuses)
        a.checkIn("team-1", day)
        val task = a.addTask("team-1", day, NewTaskRecord("screening", "Block 7 screening", "Block 7", null, "z1", listOf(), null))
        a.addToTally("team-1", day, "samples_taken", 12u)
        a.addToTally("team-1", day, "samples_taken", 3u)
        a.setTaskStatus("team-1", day, task, "in_progress")
        val house = a.addHousehold("z1", NewHouseholdRecord("Block 7, flat 3", 2u, null, listOf("elderly")))
        val need = a.addNeed("z1", NewNeedRecord(house, "medicine", "insulin, 2 pens", "urgent"))
        val ledger = a.ledger("team-1", day) ?: error("no ledger")
        check(ledger.tallies == listOf(TallyRecord("samples_taken", 15L)), "tallies read back")
        check(ledger.tasks.single().title == "Block 7 screening" && ledger.tasks.single().status == "in_progress", "task read back")
        check(ledger.duty.single().action == "check_in" && ledger.duty.single().member == "ana", "check-in read back")
        check(a.openNeeds().map { it.id } == listOf(need) && a.openNeeds().single().priority == "urgent", "need read back")
        check(eventually(5_000) { changes.saw(ledgerDoc, false) && changes.saw("households/z1", false) },
            "change observer told of local writes")
        check(changes.threads.none { it == Thread.currentThread().name }, "callbacks come on a background thread")

        // Sync both phones through the real relay.
        check(a.pending().unacked > 0uL, "before syncing, the work is saved on the phone only")
        check("needs/$need" in a.unsavedRecords("households/z1"), "the need is marked saved on the phone only")
        val reportA = runBlocking { a.syncNow() }
        check(reportA.refused.isEmpty() && reportA.changesSent > 0uL, "phone A pushed its work")
        check(a.pending().unacked == 0uL && a.pending().lastAckMs != null, "after syncing, saved on the relay")
        check(a.unsavedRecords("households/z1").isEmpty(), "the need is marked saved on the relay")
        check(eventually(5_000) { statuses.seen.any { it is SyncStatus.Progress && it.progress.finished } },
            "status observer saw progress reach the end")
        check(runBlocking { a.diagnose() } == listOf("all checks passed: this phone can sync"), "doctor: healthy")
        check(runBlocking { a.syncFor(10.0) }.completed, "a bounded sync completes when there is time")
        check(eventually(5_000) { statuses.seen.any { it is SyncStatus.Syncing } && statuses.seen.any { it is SyncStatus.Synced } },
            "status observer saw syncing then synced")
        val b = RedlineClient.open(File(scratch, "b").path,
            settings("bao", relay, relay.token(relay.dataDir, "bao", "phone-b", "team-1", "z1")))
        val bChanges = Changes()
        b.setChangeObserver(bChanges)
        b.addToTally("team-1", day, "samples_taken", 5u)
        runBlocking { b.syncNow() }
        runBlocking { a.syncNow() }
        val la = a.ledger("team-1", day)!!
        val lb = b.ledger("team-1", day)!!
        check(la.tallies == lb.tallies && lb.tallies == listOf(TallyRecord("samples_taken", 20L)), "both phones converge on the tally")
        check(la.tasks.map { it.id } == lb.tasks.map { it.id }, "both phones hold the same tasks")
        check(b.openNeeds().map { it.id } == listOf(need), "the need reached phone B")
        check(eventually(5_000) { bChanges.saw(ledgerDoc, true) }, "phone B's observer told of synced changes")
        val recon = a.reconcile("team-1", day)!!
        check(recon.members.map { it.member }.sorted() == listOf("ana", "bao"), "the reconciled day names both members")

        // Bad calls throw the mapped exceptions.
        try {
            a.addNeed("z1", NewNeedRecord(house, "food", "rice", "whenever"))
            check(false, "an invalid priority must throw")
        } catch (e: RedlineException.InvalidInput) {
            check(e.reason.contains("priority"), "invalid priority -> InvalidInput (${e.reason})")
        }
        try {
            a.ledger("team-1", "2026-13-40")
            check(false, "an invalid day must throw")
        } catch (e: RedlineException.InvalidInput) {
            check(true, "invalid day -> InvalidInput")
        }
        val elsewhere = File(scratch, "other-relay").apply { mkdirs() }
        val c = RedlineClient.open(File(scratch, "c").path,
            settings("cy", relay, relay.token(elsewhere, "cy", "phone-c", "team-1", "z1")))
        c.addToTally("team-1", day, "samples_taken", 1u)
        try {
            runBlocking { c.syncNow() }
            check(false, "a token from another relay must be refused")
        } catch (e: RedlineException.Refused) {
            check(e.code.toInt() == 7 && e.name == "unauthorized", "wrong token -> Refused(7, unauthorized)")
        }
        check(c.ledger("team-1", day)!!.tallies.single().total == 1L, "a refused sync loses no local write")
        try {
            RedlineClient.open(File(scratch, "d").path, settings("dee", relay, "not-a-token"))
            check(false, "a malformed token must throw")
        } catch (e: RedlineException.InvalidInput) {
            check(true, "malformed token -> InvalidInput")
        }
        a.shutdown()
        try {
            a.openNeeds()
            check(false, "a closed client must throw")
        } catch (e: RedlineException.Closed) {
            check(true, "closed client -> Closed")
        }
        b.shutdown()
        c.shutdown()
    } finally {
        relay.stop()
    }
    println("all Kotlin checks passed in ${(System.nanoTime() - started) / 1_000_000} ms")
}

fun main(args: Array<String>) {
    try {
        run(args[0], File(args[1]))
        exitProcess(0)
    } catch (t: Throwable) {
        System.err.println("FAILED: $t")
        t.printStackTrace()
        exitProcess(1)
    }
}
