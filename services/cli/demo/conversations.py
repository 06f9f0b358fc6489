"""Conversation and marketing text of the demo, as plain constants.

It holds the chat bot's greetings and hand-offs, the customers' openers per contact reason and
their frustrated repeats, the agents' greetings, questions, transfers, resolutions and closings,
customers' closing lines by mood, abandon lines, social posts and replies, survey comments by score
band, and the email and SMS campaigns. The phrases are written so a sentiment model finds positive,
negative and neutral text; templates carry ``str.format`` fields (``{order}``, ``{product}``,
``{amount}``, ``{first}``, ``{agent}``, ``{queue}``, ...) that the generator fills in. They are kept
apart from the generator so its logic stays readable; as with the vocabulary, the seeded generator
picks by position, so editing a tuple changes the dataset.
"""

from __future__ import annotations

from typing import Final

BOT_GREETINGS: Final = (
    "Hi there! I'm Pine, the Harbor & Pine virtual assistant. What can I help you with today?",
    "Welcome to Harbor & Pine support. Tell me a little about what you need and I'll find the right person.",
    "Hello! You're chatting with our assistant. You can ask about orders, returns, billing or your account.",
)
BOT_HANDOFFS: Final = (
    "Thanks! I'm connecting you with someone from our {queue} team. The current wait is about {wait} minutes.",
    "Got it. Let me find a {queue} specialist for you, it should only take a few minutes.",
)
OPENERS: Final = {
    "billing_question": (
        "Hi, I have a question about my last bill. Can you explain the charge of {amount}?",
        "Hello, I don't understand my latest invoice, there's a line for {amount} I don't recognise.",
    ),
    "unexpected_charge": (
        "I was charged {amount} twice for order {order}. Please fix this.",
        "There's a charge of {amount} on my card that I never authorised. What is going on?",
    ),
    "payment_failed": (
        "My payment keeps getting declined at checkout even though my card works everywhere else.",
        "Hi, I tried to pay for order {order} but it says payment failed.",
    ),
    "refund_status": (
        "I returned my order two weeks ago and still haven't received my refund of {amount}.",
        "Can you tell me when my refund for order {order} will arrive?",
    ),
    "password_reset": (
        "I can't log in, the password reset email never arrives.",
        "Hi, I need help resetting my password please.",
    ),
    "app_not_working": (
        "The app crashes every time I open my order history.",
        "Your app won't let me check out, it just spins forever. Very annoying.",
    ),
    "account_access": (
        "My account got locked after I changed my email address.",
        "I can't access my account anymore, it says my email isn't registered.",
    ),
    "order_status": (
        "Hi, where is my order {order}? The tracking hasn't updated in days.",
        "Can you check the status of order {order} for me?",
    ),
    "delivery_delay": (
        "My order {order} was supposed to arrive last Tuesday and it still isn't here.",
        "The delivery is a week late and I needed it for a birthday. Really disappointed.",
    ),
    "damaged_item": (
        "The {product} I received is damaged, the box was completely crushed.",
        "My {product} arrived broken. I'd like a replacement.",
    ),
    "return_request": (
        "I'd like to return the {product} from order {order}, it doesn't fit.",
        "How do I return an item? The {product} isn't what I expected.",
    ),
    "wrong_item": (
        "I ordered the {product} but received something completely different.",
        "You sent me the wrong item in order {order}.",
    ),
    "product_question": (
        "Does the {product} come in other sizes?",
        "Hi! Quick question, is the {product} machine washable?",
    ),
    "plan_upgrade": (
        "I'd like to upgrade my membership to the Plus plan. What are the benefits?",
        "Can I switch to annual billing for my membership?",
    ),
    "cancel_membership": (
        "I want to cancel my membership, I'm not using it enough.",
        "Please cancel my subscription, it's too expensive for me right now.",
    ),
}
RESOLUTIONS: Final = {
    "billing_question": "That {amount} is your membership renewal. I've emailed you an itemised invoice.",
    "unexpected_charge": "I can see the duplicate charge. I've reversed the extra {amount}; it should "
    "disappear within 3-5 business days.",
    "payment_failed": "Your bank flagged the payment. I've cleared the hold on our side, please try again now.",
    "refund_status": "Your refund of {amount} was processed today and should reach your card within 5 business days.",
    "password_reset": "I've sent a fresh reset link. It should arrive in a minute, please check spam too.",
    "app_not_working": "Thanks for the details. Updating to the latest app version fixes that crash, and "
    "I've cleared your session.",
    "account_access": "I've unlocked your account and updated the email on file. You can sign in now.",
    "order_status": "Order {order} is with the carrier and scheduled for delivery tomorrow.",
    "delivery_delay": "I'm sorry about the delay. I've upgraded your shipping to express at no cost and "
    "refunded the delivery fee.",
    "damaged_item": "I'm so sorry about that. A replacement {product} ships today and you don't need to "
    "send the damaged one back.",
    "return_request": "I've emailed you a prepaid return label. Once we receive the {product} your refund "
    "is issued within 3 days.",
    "wrong_item": "Apologies for the mix-up! The correct {product} ships today by express, with a return "
    "label for the wrong one.",
    "product_question": "Yes, the {product} comes in sizes XS to XXL and it's machine washable at 30 degrees.",
    "plan_upgrade": "Done! You're on the Plus plan now with free express shipping and early access to sales.",
    "cancel_membership": "I've cancelled your membership; you keep your benefits until the end of the billing period.",
}
UNRESOLVED: Final = (
    "I've escalated this to our specialist team; they will get back to you within 48 hours.",
    "I'm unable to fix this from my side, so I've opened a ticket with the warehouse. You'll get an update by email.",
    "I need to check with another department. I'll follow up with you tomorrow.",
)
FRUSTRATED: Final = (
    "This is the second time I'm contacting you about this and it's still not sorted.",
    "I was promised a follow up and nobody got back to me. This is really frustrating.",
    "Honestly the service has been terrible, I've explained this problem several times now.",
    "I'm very unhappy, I was told this would be fixed days ago.",
)
AGENT_GREETINGS: Final = (
    "Hi {first}, my name is {agent}. I'm sorry to hear about that, let me take a look.",
    "Hello {first}, thanks for reaching out! I'm {agent} and I'll be happy to help.",
    "Hi {first}, {agent} here. Thanks for your patience while you waited.",
)
AGENT_ASKS: Final = (
    "Could you confirm the order number for me?",
    "Can you share the order number so I can look into it?",
    "Thanks, just a moment while I pull up your account.",
)
CUSTOMER_DETAILS: Final = (
    "Sure, it's order {order}.",
    "The order number is {order}.",
    "Ok, it's {order}. I placed it about ten days ago.",
)
AGENT_TRANSFERS: Final = (
    "I'm going to transfer you to our {queue} team, they can sort this out for you. One moment please.",
    "This needs our {queue} team, so I'll transfer you now. Thanks for bearing with me.",
)
AGENT_CLOSINGS: Final = (
    "Is there anything else I can help you with today?",
    "Thanks for contacting Harbor & Pine, {first}. Have a great day!",
)
CLOSING_POSITIVE: Final = (
    "Thank you so much, that's perfect!",
    "Great, I really appreciate the quick help.",
    "Awesome, you've been super helpful. Have a great day!",
    "Wonderful, thanks for sorting that out so fast.",
)
CLOSING_NEUTRAL: Final = ("Ok, thanks.", "Got it.", "Alright, I'll wait for the email.", "Ok.")
CLOSING_NEGATIVE: Final = (
    "Fine. I hope it actually gets fixed this time.",
    "Not happy about this, but ok.",
    "That doesn't help me at all. I'll take my business elsewhere.",
    "This is ridiculous, I've wasted so much time on this.",
)
ABANDON_LINES: Final = (
    "Hello? Is anyone there?",
    "I've been waiting forever, forget it.",
    "Still waiting...",
)
SOCIAL_NEGATIVE: Final = (
    "@HarborAndPine still waiting on my refund for order {order}. Two weeks and counting. Not impressed.",
    "@HarborAndPine worst delivery experience ever, my package is a week late and nobody answers.",
    "@HarborAndPine your app has been broken all day and I can't check out. Fix it please!",
)
SOCIAL_POSITIVE: Final = (
    "Huge thanks to @HarborAndPine support for sorting out my order in minutes!",
    "@HarborAndPine love my new {product}, great quality and fast shipping.",
)
SOCIAL_NEUTRAL: Final = (
    "@HarborAndPine does the {product} come in navy?",
    "@HarborAndPine what time does the {city} store open on Sundays?",
)
SOCIAL_REPLIES: Final = (
    "Hi {first}, we're sorry to hear that! We've sent you a DM so we can look into it. ^{initials}",
    "Thanks for reaching out, {first}! Check your DMs and we'll get this sorted. ^{initials}",
    "Thanks so much for the kind words, {first}! We'll pass them on to the team. ^{initials}",
)
COMMENTS_POSITIVE: Final = (
    "Quick and friendly help, thank you!",
    "The agent was fantastic and solved it on the first contact.",
    "Love the products, and support was easy to reach.",
    "Really smooth experience, would recommend to friends.",
    "Great service, the refund came through faster than expected.",
)
COMMENTS_NEUTRAL: Final = (
    "It was ok, took a bit longer than I'd like.",
    "Fine, but I had to explain my issue twice.",
    "Average experience. The website could be clearer about delivery times.",
)
COMMENTS_NEGATIVE: Final = (
    "Waited on hold for ages and the problem still isn't fixed.",
    "Several contacts for one simple refund. Very frustrating.",
    "Nobody got back to me as promised. Disappointed.",
    "The agent was polite but couldn't actually help.",
    "Terrible experience, I'm considering shopping elsewhere.",
)
EMAIL_CAMPAIGNS: Final = (
    ("New arrivals for the season", "new-arrivals"),
    ("Members save 20% this weekend", "members-weekend"),
    ("Your guide to layering", "layering-guide"),
    ("Last chance: sale ends tonight", "sale-last-chance"),
    ("Camping essentials are back", "camping-essentials"),
    ("Free shipping on home goods", "home-free-shipping"),
    ("Meet our new linen collection", "linen-launch"),
)
SMS_CAMPAIGNS: Final = (
    ("Harbor & Pine: 48h flash sale, 25% off outdoor. Reply STOP to opt out.", "flash-outdoor"),
    ("Harbor & Pine: your Plus perks just got better. Reply STOP to opt out.", "plus-perks"),
    ("Harbor & Pine: new store opening near you this Saturday! Reply STOP to opt out.", "store-opening"),
)
