"""Deterministic small contracts for the offline demo and fast tests.

Each contract (about 150-350 tokens) has a preamble with parties and a date, a few boilerplate sections, and
3-5 of the 13 clause types below in numbered sections. Every clause type has five wordings: train and valid
draw from the first three, test from the last two, so a test score measures copying, not memorised wording.
Each contract gives one example asking for a clause it has, and with probability none_prob one asking for a
clause type it lacks (answer NONE).
"""
import random

from data.example import NONE, SPLITS, Example, stable_hash

TRAIN_WORDINGS, TEST_WORDINGS = slice(0, 3), slice(3, 5)

CLAUSES = {
    "Governing Law": (
        "This Agreement shall be governed by and construed in accordance with the laws of the State of {state}, "
        "without regard to its conflict of laws principles.",
        "The laws of the State of {state} govern this Agreement and any dispute arising out of or relating to it.",
        "All questions concerning the construction, validity and interpretation of this Agreement will be governed "
        "by the internal laws of the State of {state}.",
        "This Agreement and all claims arising from it are subject to the laws of {state}, excluding any choice of "
        "law rules that would apply the law of another jurisdiction.",
        "Each party agrees that the law of the State of {state} shall apply to this Agreement in all respects.",
    ),
    "Termination for Convenience": (
        "Either party may terminate this Agreement at any time, for any reason or no reason, upon {days} days' "
        "prior written notice to the other party.",
        "{A} may terminate this Agreement for convenience by giving {B} at least {days} days' written notice.",
        "This Agreement may be terminated by either party without cause on {days} days' written notice.",
        "Without cause and at its sole discretion, {A} may end this Agreement by delivering written notice to {B} "
        "no less than {days} days in advance.",
        "Each party has the right to terminate this Agreement for any reason upon providing the other party with "
        "{days} days' notice in writing.",
    ),
    "Confidentiality": (
        "Each party shall keep confidential all Confidential Information of the other party and shall not disclose "
        "it to any third party without the other party's prior written consent.",
        "{B} shall hold in strict confidence, and shall not use except to perform this Agreement, any confidential "
        "information received from {A}.",
        "The receiving party shall protect the disclosing party's Confidential Information using at least the same "
        "degree of care it uses to protect its own confidential information, and in no event less than reasonable "
        "care.",
        "Neither party will reveal the other party's non-public business or technical information to anyone other "
        "than its employees who need to know it for this Agreement.",
        "All non-public information exchanged under this Agreement shall be treated as secret by the recipient for "
        "{years} years after disclosure.",
    ),
    "Non-Compete": (
        "During the term of this Agreement and for {months} months thereafter, {B} shall not engage in any business "
        "that competes with the business of {A}.",
        "{B} agrees that it will not, directly or indirectly, develop or sell products that compete with the "
        "Products for a period of {years} years after the Effective Date.",
        "For {months} months following termination, {B} shall not provide services to any competitor of {A} within "
        "the State of {state}.",
        "While this Agreement is in effect, {B} may not own, manage or operate any enterprise that is in competition "
        "with {A}.",
        "{B} covenants not to enter into any business competitive with {A} in {state} during the term and for "
        "{years} years after it ends.",
    ),
    "Payment Terms": (
        "{A} shall pay each undisputed invoice issued by {B} within {days} days after receipt.",
        "All fees are due and payable within {days} days of the invoice date; late payments bear interest at {pct}% "
        "per month.",
        "{A} will pay {B} a monthly fee of ${amount}, payable in advance on the first day of each month.",
        "Invoices issued by {B} are payable by {A} no later than {days} days from the date of issue.",
        "In consideration of the Services, {A} shall remit ${amount} to {B} each quarter, net {days} days.",
    ),
    "Cap on Liability": (
        "In no event shall either party's total liability under this Agreement exceed ${amount}.",
        "The aggregate liability of {B} arising out of this Agreement shall not exceed the fees paid by {A} in the "
        "{months} months preceding the claim.",
        "Each party's maximum cumulative liability for all claims relating to this Agreement is limited to ${amount}.",
        "Under no circumstances will {B} be liable for more than the total amounts paid to it under this Agreement.",
        "The liability of either party for any and all claims shall be capped at ${amount} in the aggregate.",
    ),
    "Indemnification": (
        "{B} shall indemnify, defend and hold harmless {A} from and against all claims, losses and expenses arising "
        "from {B}'s breach of this Agreement.",
        "Each party shall indemnify the other party against any third-party claim resulting from its gross "
        "negligence or willful misconduct.",
        "{A} agrees to indemnify {B} for any losses caused by {A}'s use of the Deliverables.",
        "{B} will defend {A} against any claim brought by a third party alleging that the Services infringe that "
        "party's rights, and will pay any resulting damages.",
        "Each party will hold the other harmless from any liability that results from its own negligent acts.",
    ),
    "Anti-Assignment": (
        "Neither party may assign this Agreement without the prior written consent of the other party.",
        "{B} shall not assign or transfer any of its rights or obligations under this Agreement without {A}'s prior "
        "written consent.",
        "This Agreement may not be assigned by either party, except to a successor to all or substantially all of "
        "its business, without the other party's consent.",
        "Any attempt by {B} to transfer this Agreement to a third party without first obtaining {A}'s written "
        "approval shall be void.",
        "No party shall delegate or assign this Agreement, in whole or in part, unless the other party has agreed "
        "in writing.",
    ),
    "Insurance": (
        "{B} shall maintain commercial general liability insurance with limits of at least ${amount} per occurrence.",
        "During the term, {B} will carry insurance coverage in an amount not less than ${amount} and will name {A} "
        "as an additional insured.",
        "Each party shall maintain adequate insurance to cover its obligations under this Agreement.",
        "{B} agrees to keep in force, at its own cost, liability insurance of no less than ${amount} for each claim.",
        "Throughout this Agreement, {B} must hold professional liability coverage of ${amount} and provide "
        "certificates of insurance upon request.",
    ),
    "Audit Rights": (
        "{A} may audit the books and records of {B} relating to this Agreement once per calendar year upon {days} "
        "days' notice.",
        "{B} shall keep accurate records and shall permit {A} or its auditors to inspect those records during "
        "normal business hours.",
        "Upon reasonable notice, {A} shall have the right to examine {B}'s accounts to verify the fees charged "
        "under this Agreement.",
        "Once every twelve months, {A}'s accountants may review {B}'s financial records related to the Services.",
        "{B} grants {A} access to its facilities and records for the purpose of verifying compliance with this "
        "Agreement, on {days} days' prior notice.",
    ),
    "Renewal Term": (
        "This Agreement shall automatically renew for successive {years}-year terms unless either party gives "
        "notice of non-renewal at least {days} days before the end of the then-current term.",
        "Upon expiration of the Initial Term, this Agreement will renew for additional periods of {months} months "
        "unless either party elects not to renew.",
        "The term of this Agreement shall be extended automatically for one-year periods unless a party objects in "
        "writing.",
        "At the end of each term, this Agreement continues for a further {years} years unless one party notifies "
        "the other that it does not wish to renew.",
        "This Agreement renews itself for consecutive renewal periods of {months} months each, unless cancelled in "
        "writing {days} days before renewal.",
    ),
    "Force Majeure": (
        "Neither party shall be liable for any failure or delay in performance caused by events beyond its "
        "reasonable control, including fire, flood, war or acts of God.",
        "A party whose performance is prevented by a force majeure event shall be excused from performance for the "
        "duration of that event.",
        "{B} will not be responsible for delays resulting from strikes, natural disasters, or governmental action.",
        "If circumstances outside a party's control, such as an earthquake or epidemic, prevent it from performing, "
        "its obligations are suspended while those circumstances last.",
        "Neither party is in breach of this Agreement to the extent its performance is hindered by an unforeseeable "
        "event beyond its control.",
    ),
    "Warranty Duration": (
        "{B} warrants that the Products will be free from defects in materials and workmanship for {months} months "
        "from delivery.",
        "The warranty period for all Deliverables shall be {years} years from acceptance.",
        "{B} warrants that the Services will conform to the specifications for a period of {days} days after "
        "completion.",
        "For {months} months after installation, {B} guarantees that each Product will operate in accordance with "
        "its documentation.",
        "Any Deliverable that fails to meet its specifications within {days} days of acceptance will be corrected "
        "by {B} at no charge.",
    ),
}

BOILERPLATE = (
    "Entire Agreement. This Agreement constitutes the entire agreement between the parties and supersedes all "
    "prior agreements relating to its subject matter.",
    "Notices. All notices under this Agreement shall be in writing and delivered to the addresses set out above.",
    "Counterparts. This Agreement may be executed in counterparts, each of which shall be deemed an original.",
    "Severability. If any provision of this Agreement is held invalid, the remaining provisions shall continue in "
    "full force and effect.",
    "Relationship. The parties are independent contractors, and nothing in this Agreement creates a partnership "
    "or joint venture.",
)
TITLES = ("Master Services Agreement", "Supply Agreement", "Consulting Agreement", "Distribution Agreement",
          "Software License Agreement", "Marketing Agreement")
COMPANIES = ("Northwind Traders", "Bluebird Analytics", "Cedar Ridge Foods", "Harbor Point Logistics",
             "Ironwood Software", "Lakeside Medical", "Maple Leaf Energy", "Orion Robotics", "Pinecrest Pharma",
             "Quarry Hill Mining", "Redstone Media", "Silverline Telecom", "Summit Peak Apparel", "Tidewater Marine",
             "Union Square Capital", "Valley Forge Tools", "Westbrook Foods", "Yellowstone Outfitters")
SUFFIXES = ("Inc.", "LLC", "Corp.", "Ltd.")
STATES = ("Delaware", "New York", "California", "Texas", "Illinois", "Washington", "Florida", "Ohio", "Georgia",
          "Colorado", "Nevada", "Oregon")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
SIZES = {"train": 300, "valid": 16, "test": 44}


def _contract(rng: random.Random, split: str):
    a_name, b_name = rng.sample(COMPANIES, 2)
    a_full, b_full = f"{a_name}, {rng.choice(SUFFIXES)}", f"{b_name}, {rng.choice(SUFFIXES)}"
    slots = dict(A=a_name, B=b_name, state=rng.choice(STATES), days=rng.choice((10, 15, 30, 45, 60, 90)),
                 months=rng.choice((3, 6, 12, 18, 24)), years=rng.choice((1, 2, 3, 5)), pct=rng.choice((1, 1.5, 2)),
                 amount=f"{rng.choice((50, 100, 250, 500, 1000, 2000)) * 1000:,}")
    title = rng.choice(TITLES)
    date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(2015, 2025)}"
    wordings = TEST_WORDINGS if split == "test" else TRAIN_WORDINGS
    present = rng.sample(sorted(CLAUSES), rng.randint(3, 5))
    clauses = {t: rng.choice(CLAUSES[t][wordings]).format(**slots) for t in present}
    sections = list(clauses.values()) + rng.sample(BOILERPLATE, rng.randint(0, 1))
    rng.shuffle(sections)
    sections.insert(0, f"Services. {b_name} shall provide to {a_name} the services described in Exhibit A "
                       f"(the \"Services\").")
    text = (f"{title.upper()}\n\nThis {title} (the \"Agreement\") is entered into as of {date} (the \"Effective "
            f"Date\") by and between {a_full}, a {rng.choice(STATES)} company (\"{a_name}\"), and {b_full}, a "
            f"{rng.choice(STATES)} company (\"{b_name}\").\n\n"
            + "\n\n".join(f"{i}. {s}" for i, s in enumerate(sections, 1))
            + "\n\nIN WITNESS WHEREOF, the parties have executed this Agreement as of the Effective Date.")
    return text, clauses


def load(split=None, *, sizes: dict | None = None, none_prob: float = 0.25, seed: int = 0):
    sizes = {**SIZES, **(sizes or {})}
    examples, counts = [], {}
    for s in SPLITS if split is None else (split,):
        c = {"contracts": sizes[s], "clause": 0, "none": 0}
        for i in range(sizes[s]):
            rng = random.Random(stable_hash("synthetic", str(seed), s, str(i)))
            text, clauses = _contract(rng, s)
            cat = rng.choice(sorted(clauses))
            examples.append(Example(id=f"synthetic:{s}:{i}:{cat}", source="synthetic", category=cat, query=cat,
                                    context=text, answer=clauses[cat], split=s))
            c["clause"] += 1
            if rng.random() < none_prob:
                cat = rng.choice(sorted(set(CLAUSES) - set(clauses)))
                examples.append(Example(id=f"synthetic:{s}:{i}:{cat}", source="synthetic", category=cat, query=cat,
                                        context=text, answer=NONE, split=s))
                c["none"] += 1
        counts[s] = c
    return examples, {"counts": counts}
