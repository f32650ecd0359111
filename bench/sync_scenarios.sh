# bench/sync_scenarios.sh - the clknetsim network/clock scenarios of bench/sync.
# Sourced by bench/sync after simlib.sh (needs sim_conf).  Our own code.
#
# sync_scenario NAME sets
#   NODES        number of simulated nodes (servers first, the client last)
#   CLIENT_NODE  the client under test (= NODES)
#   SERVERS      number of server nodes (1..NODES-1), each chronyd -x `local stratum 1`
# and appends the clknetsim config lines (see clknetsim's README, "Configuration file").
# Times are in seconds, frequencies in s/s (1e-6 = 1 ppm); every expression is evaluated
# per packet (delays) or once per simulated second (frequencies); a negative delay drops
# the packet.

SYNC_SCENARIOS="base loss jitter temp three"

# one-way delay of the base scenario: 100 us + 100 us * Exp(1)
_sync_delay="(+ 1e-4 (* 1e-4 (exponential)))"
# random-walk frequency wander of the client: 1e-9/s
_sync_wander="(sum (* 1e-9 (normal)))"
# the same delay, but the packet is dropped when uniform() is in [0, 0.4]: 40 % loss
# each way, so 36 % of the client's requests get a response
_sync_lossy="(+ 1e-4 (* 1e-4 (exponential)) (* -1 (equal 0.2 (uniform) 0.2)))"

sync_scenario_help() {
	cat <<-EOF
	  base    1 server; client freq 10 ppm + random walk 1e-9/s, offset 0.1 s,
	          one-way delay 1e-4 + 1e-4*Exp each way (as ../shared/clknetsim/sync_compare.sh)
	  loss    base with 40 % of the packets dropped each way (36 % of exchanges complete)
	  jitter  1 server; delay server->client 1e-4 + 1e-3*Exp, client->server 1e-4 + 1e-4*Exp;
	          client freq 100 ppm + random walk, offset 0.1 s
	  temp    base with the client frequency 10 ppm + 1 ppm * sine(period 3000 s) + random walk
	  three   3 servers (node 1 is 30 ms ahead of true time and not disciplined, -x),
	          client node 4 configured with all three; delays and client clock as base
	EOF
}

sync_scenario() {
	local d=$_sync_delay w=$_sync_wander i
	case $1 in
	base)
		NODES=2
		sim_conf "node1_delay2 = $d" "node2_delay1 = $d" \
			"node2_offset = 0.1" "node2_freq = (+ 1e-5 $w)";;
	loss)
		NODES=2
		sim_conf "node1_delay2 = $_sync_lossy" "node2_delay1 = $_sync_lossy" \
			"node2_offset = 0.1" "node2_freq = (+ 1e-5 $w)";;
	jitter)
		NODES=2
		sim_conf "node1_delay2 = (+ 1e-4 (* 1e-3 (exponential)))" \
			"node2_delay1 = (+ 1e-4 (* 1e-4 (exponential)))" \
			"node2_offset = 0.1" "node2_freq = (+ 1e-4 $w)";;
	temp)
		NODES=2
		sim_conf "node1_delay2 = $d" "node2_delay1 = $d" \
			"node2_offset = 0.1" "node2_freq = (+ 1e-5 (* 1e-6 (sine 3000)) $w)";;
	three)
		NODES=4
		for i in 1 2 3; do
			sim_conf "node${i}_delay4 = $d" "node4_delay${i} = $d"
		done
		sim_conf "node1_offset = 0.03" "node4_offset = 0.1" "node4_freq = (+ 1e-5 $w)";;
	*)
		return 1;;
	esac
	CLIENT_NODE=$NODES
	SERVERS=$((NODES - 1))
}
